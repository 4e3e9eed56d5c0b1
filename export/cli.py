"""The ``idc-export`` command: turn a trained Keras model into an ONNX file for idc-infer."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("keras_model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX file to write.")
@click.option("--parity-data", "parity_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of real patches for the Keras-vs-onnxruntime parity gate (repeatable).")
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True)
@click.option("-v", "--verbose", count=True)
def main(keras_model, out_path, parity_dirs, opset, verbose):
    """Export KERAS_MODEL (with train_meta.json beside it) to ONNX with its contract.

    Fails (exit 1) when onnxruntime's output differs from Keras' by more than 1e-4.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    from .convert import ParityError, export_fp32

    try:
        report = export_fp32(keras_model, out_path, list(parity_dirs), opset=opset)
    except ParityError as exc:
        click.echo(f"idc-export: PARITY GATE FAILED: {exc}", err=True)
        sys.exit(1)
    parity = report["parity"]
    click.echo(f"wrote {out_path} ({report['size_bytes'] / 1e6:.2f} MB, sha256 {report['sha256'][:12]}); "
               f"parity max |diff| {parity['max_abs_diff']:.2e} on {parity['n_inputs']} inputs")
    if report["contract"]["provenance"]["demo"]:
        click.echo("idc-export: this is a DEMO model (synthetic or unknown training data)", err=True)
    report_path = Path(out_path).with_suffix(".export.json")
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
