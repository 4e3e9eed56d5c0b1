"""The ``idc-train`` command: train CancerNet on a labelled patch directory."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from idc_infer.contract import PUBLIC_SET_PATCH_MPP
from idc_infer.errors import IdcError

from .data import TrainingDataError
from .options import EXIT_COLLAPSED, fail_on_os_error, recipe_options, require
from .training import DISTRIBUTE, EARLY_STOPPING


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory: model.keras, split.csv, history.csv, train_meta.json.",
)
@click.option("--epochs", type=click.IntRange(1), default=40, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@recipe_options
@click.option(
    "--learning-rate",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="[default: 1e-2 Adagrad for cancernet as the seed; 1e-3 / 1e-4 Adam for simple-cnn / transfer; "
    "1e-3 with adam-cosine]",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--split",
    default="patient",
    show_default=True,
    help="'patient' (seeded 80/10/10 of patients, stratified by IDC ratio), 'janowczyk2016' (published "
    "folds), 'folders' (the dataset's own train/ val/ test/ folders, e.g. BreakHis), 'random-patch' "
    "(the seed tutorial's leaky split) or a CSV manifest with patient_id,set.",
)
@click.option(
    "--patience",
    type=click.IntRange(0),
    default=8,
    show_default=True,
    help="Stop after this many epochs without a better validation score (see --early-stopping) and keep "
    "the best epoch; 0: no early stopping, train every epoch and keep the last (as the seed).",
)
@click.option(
    "--early-stopping",
    type=click.Choice(EARLY_STOPPING),
    default="val-auc",
    show_default=True,
    help="What --patience counts and which epoch is kept.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last epoch checkpoint.")
@click.option(
    "--distribute",
    type=click.Choice(DISTRIBUTE),
    default="none",
    show_default=True,
    help="tf.distribute: mirrored = all GPUs of this machine; multiworker = several machines (TF_CONFIG).",
)
@click.option("--mixed-precision/--no-mixed-precision", default=None, help="[default: on when a GPU is present]")
@click.option(
    "--patch-mpp",
    type=click.FloatRange(0.01, 100.0),
    default=PUBLIC_SET_PATCH_MPP,
    show_default=True,
    help="Microns per pixel of DATA_DIR's patches, recorded in the contract so slides are tiled at this "
    "scale (4.0: the public set's 2.5x patches).",
)
@click.option("-v", "--verbose", count=True)
def main(
    data_dir,
    run_dir,
    epochs,
    batch_size,
    arch,
    learning_rate,
    seed,
    split,
    patience,
    augment,
    optimizer,
    patient_weight,
    early_stopping,
    resume,
    distribute,
    mixed_precision,
    patch_mpp,
    verbose,
):
    """Train CancerNet on DATA_DIR (Kaggle layout <pid>/<0|1>/*.png) with a patient-level split."""
    require("idc-train", "train", "tensorflow", "matplotlib")
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr
    )
    from .data import check_split

    try:
        check_split(split)
    except TrainingDataError as exc:
        raise click.BadParameter(str(exc), param_hint="--split") from None
    from .architectures import default_learning_rate
    from .training import CollapsedModelError, TrainConfig, train

    if resume and not (Path(run_dir) / "checkpoints").is_dir():
        raise click.BadParameter(f"{run_dir} holds no checkpoints to resume from", param_hint="--resume")
    config = TrainConfig(
        data_dir,
        run_dir,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        learning_rate=learning_rate or default_learning_rate(arch, optimizer),
        split=split,
        patience=patience,
        augment=augment,
        optimizer=optimizer,
        patient_weight=patient_weight,
        early_stopping=early_stopping,
        arch=arch,
        resume=resume,
        distribute=distribute,
        mixed_precision=mixed_precision,
        patch_mpp=patch_mpp,
    )
    try:
        meta = train(config)
    except CollapsedModelError as exc:  # one of idc's own errors, but a failed run, not a usage error
        click.echo(f"idc-train: FAILED: {exc}", err=True)
        sys.exit(EXIT_COLLAPSED)
    except IdcError as exc:  # a bad manifest, ids that match no split, a missing class, a bad contract...
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        fail_on_os_error("idc-train", exc)
    for name, m in meta["metrics"].items():
        click.echo(
            f"{name}: n={m['n']} ROC-AUC={m['roc_auc']:.3f} balanced_accuracy={m['balanced_accuracy']:.3f} "
            f"sensitivity={m['sensitivity']:.3f} specificity={m['specificity']:.3f} F1={m['f1']:.3f} "
            f"(threshold {m['threshold']:.3f})"
        )
    if meta["demo"]:
        click.echo("idc-train: trained on SYNTHETIC data: this is a demo model", err=True)
    click.echo(f"model written to {Path(run_dir) / 'model.keras'}")
    report = Path(run_dir) / "eval-test" / "report.txt"
    if report.exists():  # the test patients' report (with the published results on janowczyk2016 folds)
        click.echo("")
        click.echo(report.read_text(encoding="utf-8"), nl=False)
        click.echo(f"evaluation files and plots: {report.parent}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--split",
    default=None,
    help="Evaluate one set of a split (patient, janowczyk2016, folders, "
    "random-patch, or a manifest CSV); default: every labelled patch in DATA_DIR.",
)
@click.option("--set", "set_name", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="[default: the model's]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a 'patient' or 'random-patch' split.")
@click.option(
    "--history",
    "history_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="history.csv of the training run, for curves.png [default: the one beside MODEL, if any].",
)
def eval_main(model_path, data_dir, out_dir, split, set_name, threshold, seed, history_csv):
    """Evaluate MODEL (.keras or .onnx) on labelled patches in DATA_DIR: metrics.json, report.txt, plots."""
    require("idc-eval", "train", "matplotlib", *(["tensorflow"] if model_path.suffix == ".keras" else []))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    from .data import check_split
    from .evaluate import evaluate

    if split is not None:
        try:
            check_split(split)
        except TrainingDataError as exc:
            raise click.BadParameter(str(exc), param_hint="--split") from None
    try:
        evaluate(
            model_path,
            data_dir,
            out_dir,
            split=split,
            set_name=set_name,
            threshold=threshold,
            seed=seed,
            history_csv=history_csv,
        )
    except IdcError as exc:  # no labelled patches, a file that is no model, a damaged train_meta.json...
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        fail_on_os_error("idc-eval", exc)
    click.echo((Path(out_dir) / "report.txt").read_text(encoding="utf-8"), nl=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--folds", type=click.IntRange(3), default=4, show_default=True)
@recipe_options
@click.option("--epochs", type=click.IntRange(1), default=40, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--patience", type=click.IntRange(1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted cross-validation in --out: finished folds are reused, the interrupted "
    "one continues from its last epoch checkpoint. Needs the same data and options.",
)
def crossval_main(
    data_dir, out_dir, folds, arch, epochs, batch_size, patience, seed, optimizer, augment, patient_weight, resume
):
    """Patient-level k-fold cross-validation of the training recipe on DATA_DIR (pooled out-of-fold metrics).

    \b
    Exit codes: 0 done; 2 usage error; 3 a fold's model collapsed to a constant output.
    """
    require("idc-crossval", "train", "tensorflow", "matplotlib")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    from .architectures import default_learning_rate
    from .crossval import cross_validate
    from .training import CollapsedModelError, TrainConfig

    base = TrainConfig(
        data_dir,
        out_dir,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        patience=patience,
        arch=arch,
        learning_rate=default_learning_rate(arch, optimizer),
        optimizer=optimizer,
        augment=augment,
        patient_weight=patient_weight,
    )
    try:
        result = cross_validate(base, folds, out_dir, resume=resume)
    except CollapsedModelError as exc:
        click.echo(f"idc-crossval: FAILED: {exc} (finished folds are kept for --resume)", err=True)
        sys.exit(EXIT_COLLAPSED)
    except IdcError as exc:
        raise click.UsageError(str(exc)) from None
    m = result["pooled_out_of_fold"]
    click.echo(
        f"{folds}-fold patient CV, pooled out-of-fold (n={m['n']}): ROC-AUC {m['roc_auc']:.3f}, balanced accuracy "
        f"{m['balanced_accuracy']:.3f}, sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}, "
        f"F1 {m['f1']:.3f}"
    )
    if "baseline_darkness_roc_auc" in m:
        click.echo(
            f"darkness baseline on the same patches: ROC-AUC {m['baseline_darkness_roc_auc']:.3f} "
            f"(1 - mean intensity; the CNN should beat it)"
        )
