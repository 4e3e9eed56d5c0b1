"""The training recipe's choices, defined once (no TensorFlow import), and the click options built from them."""

from __future__ import annotations

import errno
import importlib.util
import sys

import click

from idc_infer.errors import EXIT_FAILED

ARCHITECTURES = ("cancernet", "simple-cnn", "transfer")
AUGMENTATIONS = ("idc", "hed", "seed", "both", "none")
OPTIMIZERS = ("seed", "adam-cosine")
PATIENT_WEIGHTS = ("none", "sqrt", "equal")


def recipe_options(function):
    """--arch, --optimizer, --augment and --patient-weight, shared by idc-train and idc-crossval."""
    decorators = [
        click.option(
            "--arch",
            type=click.Choice(ARCHITECTURES),
            default="cancernet",
            show_default=True,
            help="cancernet (the seed tutorial), simple-cnn (the seed's plain CNN), transfer (MobileNetV2 backbone).",
        ),
        click.option(
            "--optimizer",
            type=click.Choice(OPTIMIZERS),
            default="seed",
            show_default=True,
            help="seed: the architecture's seed optimizer (Adagrad with inverse-time decay for cancernet, "
            "Adam for the others); adam-cosine: Adam with the learning rate decayed to 0 by a cosine "
            "over --epochs.",
        ),
        click.option(
            "--augment",
            type=click.Choice(AUGMENTATIONS),
            default="idc",
            show_default=True,
            help="idc: flips, right-angle rotations, RGB colour jitter (breaks the brightness shortcut); hed: "
            "flips, rotations, brightness/contrast and stain jitter in HED colour space (Tellez et al. "
            "2019); seed: the tutorial's rotation 20, zoom, shifts, shear and flips; both (idc + seed); "
            "none.",
        ),
        click.option(
            "--patient-weight",
            type=click.Choice(PATIENT_WEIGHTS),
            default="none",
            show_default=True,
            help="How much each patient weighs in training: none (every patch 1), sqrt (a patient of n "
            "patches weighs sqrt(n)), equal (every patient the same); both classes are balanced after it.",
        ),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


EXIT_WRITE_FAILED = EXIT_FAILED
EXIT_COLLAPSED = 3  # training finished but the model outputs (almost) one value for every patch


def require(command: str, extra: str, *modules: str) -> None:
    """A usage error naming the extra to install when a module the command needs is missing
    (idc-train on a lab PC's inference-only install, for one), instead of a ModuleNotFoundError."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise click.UsageError(
            f"{command} needs {', '.join(missing)}, which this install lacks: "
            f"pip install 'idc[{extra}]' (the base install runs idc-infer only)"
        )


def fail_on_os_error(command: str, exc: OSError) -> None:
    """Exit 1 with a message for a file system failure that is not the user's input (disk full, read-only
    folder); a missing input is a usage error (exit 2)."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        raise click.UsageError(str(exc))
    reason = errno.errorcode.get(exc.errno or 0, "")
    click.echo(f"{command}: cannot read or write files: {exc}" + (f" ({reason})" if reason else ""), err=True)
    sys.exit(EXIT_WRITE_FAILED)
