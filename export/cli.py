"""The ``idc-export`` command: turn a trained Keras model into ONNX files for idc-infer."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from idc_infer.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

from .convert import DEFAULT_OPSET, OPSET_RANGE  # constants only: convert imports TensorFlow inside its functions
from .quantize import ACTIVATION_TYPES, CALIBRATION_METHODS, HEAD_PRECISIONS, WEIGHT_RANGES

EXIT_PARITY = EXIT_FAILED  # the fp32 parity gate failed: nothing written
EXIT_INT8_GATE = 3  # fp32 written, int8 failed its accuracy gate

HELP_EPILOG = f"""\b
Exit codes:
  {EXIT_OK}  all files written, all gates passed
  {EXIT_PARITY}  fp32 parity gate failed: nothing written
  {EXIT_USAGE}  usage error, or int8 could not run (no calibration or gate data):
     fp32, report and card are written
  {EXIT_INT8_GATE}  int8 accuracy gate failed: fp32, report and card written; the int8 file is
     kept only as cancernet-int8.rejected.onnx, which idc-infer refuses unless --allow-failed-gate

Research use only.
"""


def _export_single_file(keras_model: Path, out_path: Path, parity_dirs, opset: int) -> None:
    """The original single-file mode (--out FILE.onnx): fp32 only, report beside it."""
    from .convert import ConversionError, ParityError, export_fp32

    try:
        report = export_fp32(keras_model, out_path, list(parity_dirs), opset=opset)
    except ParityError as exc:
        click.echo(f"idc-export: PARITY GATE FAILED: {exc}", err=True)
        sys.exit(EXIT_PARITY)
    except ConversionError as exc:
        raise click.UsageError(str(exc)) from None
    parity = report["parity"]
    click.echo(
        f"wrote {out_path} ({report['size_bytes'] / 1e6:.2f} MB, sha256 {report['sha256'][:12]}); "
        f"parity max |diff| {parity['max_abs_diff']:.2e} on {parity['n_inputs']} inputs"
    )
    if report["contract"]["provenance"]["demo"]:
        click.echo("idc-export: this is a DEMO model (synthetic or unknown training data)", err=True)
    from idc_infer.files import write_json

    write_json(Path(out_path).with_suffix(".export.json"), report)  # atomic, and strict JSON (no NaN)


def _summarise(report: dict, out_dir: Path) -> None:
    for precision, entry in report["files"].items():
        click.echo(
            f"wrote {out_dir / entry['path']} ({precision}, {entry['size_bytes'] / 1e6:.2f} MB, "
            f"{entry['throughput_patches_per_s']:.0f} patches/s at batch {report['throughput_batch']}, "
            f"{report['throughput_threads']} thread(s); {entry['status']})"
        )
    parity = report["parity"]
    click.echo(f"parity gate passed: max |diff| {parity['max_abs_diff']:.2e} on {parity['n_inputs']} inputs")
    quant = report["quantization"]
    if quant is not None:
        gate, chosen = quant["gate"], quant["chosen"]
        head = "float" if chosen["float_head"] else "int8"
        click.echo(
            f"int8 recipe: {chosen['activation_type']} activations, {chosen['calibration_method']} calibration "
            f"on {quant['calibration']['n_patches']} patches, {7 if chosen['reduce_range'] else 8}-bit weights, "
            f"final Dense in {head}; chosen among "
            f"{len(quant['candidates'])} recipe(s) on {quant['selection']['n_patches']} other patches"
        )

        def num(value):
            return "n/a" if value is None else f"{value:.4f}"

        click.echo(
            f"int8 accuracy gate {'passed' if gate['passed'] else 'FAILED'} on {gate['n_patches']} patches: "
            f"ROC-AUC drop {num(gate['roc_auc_drop'])}, balanced-accuracy drop {num(gate['balanced_accuracy_drop'])}, "
            f"{gate['label_flips']} label flip(s), max |prob diff| {num(gate['max_abs_prob_diff'])}"
        )
    for note in report["notes"]:
        click.echo(f"idc-export: {note}", err=True)
    click.echo(f"wrote {out_dir / 'export-report.json'} and {out_dir / 'MODEL_CARD.md'}")


@click.command(epilog=HELP_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("keras_model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory for cancernet-fp32.onnx (+ int8), export-report.json and MODEL_CARD.md; "
    "a path ending in .onnx writes that one fp32 file only.",
)
@click.option(
    "--parity-data",
    "parity_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of real patches for the Keras-vs-onnxruntime parity gate (repeatable) "
    "[directory mode default: the split's validation and test patients].",
)
@click.option(
    "--opset",
    type=click.IntRange(*OPSET_RANGE),
    default=DEFAULT_OPSET,
    show_default=True,
    help=f"ONNX opset (tf2onnx converts up to {OPSET_RANGE[1]}).",
)
@click.option("--int8", is_flag=True, help="Also write a static int8 QDQ model, if it passes the accuracy gate.")
@click.option(
    "--calibration",
    "calibration_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled data to calibrate int8 on; its training-split patients are used where present "
    "[default: the training data named in train_meta.json].",
)
@click.option(
    "--gate-data",
    "gate_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled held-out patches for the int8 accuracy gate [default: the split's validation patients].",
)
@click.option(
    "--calibration-patches",
    "per_class",
    type=click.IntRange(1, 512),
    default=128,
    show_default=True,
    help="Calibration patches per class (seeded sample); onnxruntime holds ~4 MB of activations per patch.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample.")
@click.option(
    "--activation-type",
    type=click.Choice(["auto", *ACTIVATION_TYPES]),
    default="auto",
    show_default=True,
    help="int8 activation type; auto measures both and keeps the more faithful.",
)
@click.option(
    "--calibration-method",
    type=click.Choice(["auto", *CALIBRATION_METHODS]),
    default="auto",
    show_default=True,
    help="Calibration method; auto measures all three.",
)
@click.option(
    "--weight-range",
    type=click.Choice(["auto", *WEIGHT_RANGES]),
    default="auto",
    show_default=True,
    help="int8 weights in 8 bits (full) or 7 (reduced: no saturation on AVX2 CPUs without VNNI); auto measures both.",
)
@click.option(
    "--head-precision",
    type=click.Choice(["auto", *HEAD_PRECISIONS]),
    default="float",
    show_default=True,
    help="Precision of the final Dense layer (Softmax always stays float); auto measures both.",
)
@click.option(
    "--bench-threads",
    type=click.IntRange(1, 256),
    default=2,
    show_default=True,
    help="onnxruntime threads for the throughput figures in the card.",
)
@click.option(
    "--bench-seconds",
    type=click.FloatRange(0.05, 60),
    default=1.5,
    show_default=True,
    help="Timed seconds per file for the throughput figures.",
)
@click.option("-v", "--verbose", count=True)
def main(
    keras_model,
    out_path,
    parity_dirs,
    opset,
    int8,
    calibration_dir,
    gate_dir,
    per_class,
    seed,
    activation_type,
    calibration_method,
    weight_range,
    head_precision,
    bench_threads,
    bench_seconds,
    verbose,
):
    """Export KERAS_MODEL (with train_meta.json beside it) to ONNX with its contract.

    The fp32 export fails when onnxruntime's output differs from Keras' by more than 1e-4.
    With --int8, the int8 model must stay within 0.005 ROC-AUC and 0.01 balanced accuracy of
    fp32 on held-out labelled patients, or it is not written as a usable model.
    """
    from idc_train.options import require

    require("idc-export", "export", "tensorflow", "tf2onnx", "onnx")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    if out_path.suffix.lower() == ".onnx":
        if int8 or calibration_dir or gate_dir:
            raise click.UsageError("--int8 writes several files: give --out a directory, not a .onnx file")
        _export_single_file(keras_model, out_path, parity_dirs, opset)
        return
    if out_path.exists() and not out_path.is_dir():
        raise click.UsageError(f"--out {out_path} exists and is not a directory")
    if (calibration_dir or gate_dir) and not int8:
        raise click.UsageError("--calibration and --gate-data only apply with --int8")

    from .bundle import ExportOptions, export_directory
    from .convert import ConversionError, ParityError

    options = ExportOptions(
        list(parity_dirs),
        opset,
        int8,
        calibration_dir,
        gate_dir,
        per_class,
        seed,
        activation_type,
        calibration_method,
        weight_range,
        head_precision,
        bench_threads,
        bench_seconds=bench_seconds,
    )
    try:
        report = export_directory(keras_model, out_path, options)
    except ParityError as exc:
        click.echo(f"idc-export: PARITY GATE FAILED: {exc}", err=True)
        sys.exit(EXIT_PARITY)
    except ConversionError as exc:
        raise click.UsageError(str(exc)) from None
    _summarise(report, out_path)
    if report["contract"]["provenance"]["demo"]:
        click.echo("idc-export: this is a DEMO model (synthetic or unknown training data)", err=True)
    if report["int8_error"]:
        click.echo(f"idc-export: int8 quantization could not run: {report['int8_error']}", err=True)
        sys.exit(EXIT_USAGE)
    if report["int8_usable"] is False:
        gate = report["quantization"]["gate"]
        click.echo("idc-export: INT8 ACCURACY GATE FAILED: " + "; ".join(gate["reasons"]), err=True)
        click.echo(
            "idc-export: the int8 model was NOT written as cancernet-int8.onnx (kept as "
            "cancernet-int8.rejected.onnx for inspection); idc-infer will use the fp32 file",
            err=True,
        )
        sys.exit(EXIT_INT8_GATE)
