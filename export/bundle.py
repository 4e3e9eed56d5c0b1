"""One export directory: fp32 (parity-gated), optional int8 (accuracy-gated), export-report.json and MODEL_CARD.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from idc_infer import code_version
from idc_infer.files import RESEARCH_NOTICE, atomic_path, write_json
from idc_infer.model import FP32_NAME, INT8_NAME  # the shipped file names, defined once

from .convert import held_out_dirs, read_meta

# A gate-failed int8 file keeps a name idc-infer never picks as a default, and says so in its contract.
INT8_REJECTED_NAME = "cancernet-int8.rejected.onnx"
REPORT_NAME = "export-report.json"
CARD_NAME = "MODEL_CARD.md"


@dataclass
class ExportOptions:
    parity_dirs: list[Path] = field(default_factory=list)
    opset: int = 17
    int8: bool = False
    calibration_dir: Path | None = None
    gate_dir: Path | None = None
    calibration_per_class: int = 128
    seed: int = 0
    activation_type: str = "auto"
    calibration_method: str = "auto"
    weight_range: str = "auto"
    head_precision: str = "float"
    bench_threads: int = 2
    bench_batch: int = 32
    bench_seconds: float = 1.5


def _file_entry(path: Path, status: str) -> dict:
    from .convert import sha256_bytes

    data = path.read_bytes()
    return {"path": path.name, "status": status, "size_bytes": len(data), "sha256": sha256_bytes(data)}


def _remove_if_present(path: Path) -> bool:
    if path.exists():
        path.unlink()
        return True
    return False


def _machine() -> dict:
    import onnxruntime

    from .card import cpu_info

    # throughput on a busy machine is not the machine's: the load says how busy it was
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_info(),
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": load,
    }


def read_file_contract(path: Path):
    from idc_infer.contract import contract_from_metadata
    from idc_infer.model import cpu_session

    session = cpu_session(path)
    return contract_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))


def _calibrate_files(out_dir: Path, files: dict, meta: dict | None, quantization: dict | None) -> dict:
    """Fit each written file's own calibration and error rates on the validation patients and write
    them into its contract; the file entries (sha256) and the int8 contract in the report follow."""
    from .quantification import colour_reference, quantify_model, rewrite_contract, validation_set

    reports, updated = {}, {}
    colour = validation = None
    for precision, entry in files.items():  # fit every file first: a failure leaves all of them as they were
        path = out_dir / entry["path"]
        contract = read_file_contract(path)
        if validation is None:  # the files share their preprocessing: one decode, one colour reference
            validation = validation_set(meta, contract)
            colour = colour_reference(meta, contract)
        updated[precision], reports[precision] = quantify_model(path, contract, meta, colour, validation)
    for precision, contract in updated.items():
        path = out_dir / files[precision]["path"]
        if precision == "int8" and "fp32" in files:  # the fp32 file it came from was rewritten just before
            export = {**contract.provenance.get("export", {}), "fp32_sha256": files["fp32"]["sha256"]}
            contract = contract.replace(provenance={**contract.provenance, "export": export})
        rewrite_contract(path, contract)
        files[precision] = {**_file_entry(path, files[precision]["status"])}
        if precision == "int8" and quantization is not None:
            quantization["contract"] = json.loads(contract.to_json())
    return reports


def export_directory(keras_path: Path, out_dir: Path, options: ExportOptions) -> dict:
    """Write the export directory and return its report; ParityError propagates (nothing written).

    ``report["int8_usable"]`` is False when int8 was requested and failed its accuracy gate or could
    not run (then ``report["int8_error"]`` says why); None when int8 was not requested.
    """
    from .card import measure_throughput, render_model_card
    from .convert import export_fp32

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_meta(keras_path)
    notes = []
    parity_dirs = list(options.parity_dirs) or held_out_dirs(meta)
    fp32_path = out_dir / FP32_NAME
    fp32 = export_fp32(Path(keras_path), fp32_path, parity_dirs, opset=options.opset)
    files = {"fp32": _file_entry(fp32_path, "usable")}
    # an int8 file of another model beside the new fp32 would be picked first by idc-infer
    removed = [name for name in (INT8_NAME, INT8_REJECTED_NAME) if _remove_if_present(out_dir / name)]
    quantization, int8_usable, int8_error = None, None, None
    if options.int8:
        from .quantize import (
            QuantizationError,
            calibration_sets,
            candidate_settings,
            gate_set,
            quantize_int8,
            read_contract,
        )

        try:
            contract = read_contract(fp32_path)
            gate = gate_set(meta, contract, options.gate_dir)
            calibration, selection = calibration_sets(
                meta, contract, options.calibration_dir, options.calibration_per_class, options.seed, gate=gate
            )
            data, quantization = quantize_int8(
                fp32_path,
                calibration,
                selection,
                gate,
                candidate_settings(
                    options.activation_type, options.calibration_method, options.weight_range, options.head_precision
                ),
            )
        except QuantizationError as exc:
            int8_usable, int8_error = False, str(exc)
        else:
            int8_usable = quantization["gate"]["passed"]
            target = out_dir / (INT8_NAME if int8_usable else INT8_REJECTED_NAME)
            with atomic_path(target, mode="wb") as handle:
                handle.write(data)
            files["int8"] = _file_entry(target, "usable" if int8_usable else "rejected: accuracy gate failed")
    calibration_reports, calibration_error = {}, None
    try:
        calibration_reports = _calibrate_files(out_dir, files, meta, quantization)
    except ValueError as exc:  # no validation patients to fit on: the files keep raw probabilities
        calibration_error = str(exc)
        notes.append(f"not calibrated: {exc}")
    written = {entry["path"] for entry in files.values()}
    notes += [f"removed {name} left by an earlier export" for name in removed if name not in written]
    for entry in files.values():
        entry["throughput_patches_per_s"] = measure_throughput(
            out_dir / entry["path"], options.bench_batch, options.bench_threads, options.bench_seconds
        )
    report = {
        "notice": RESEARCH_NOTICE,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        # file names, not machine paths: the report ships with the model (models/export-report.json)
        "source_model": {
            "path": Path(keras_path).name,
            "sha256": fp32["contract"]["provenance"]["source_model_sha256"],
        },
        "contract": json.loads(read_file_contract(fp32_path).to_json()),
        "calibration": calibration_reports,
        "calibration_error": calibration_error,
        "files": files,
        "parity": fp32["parity"],
        "parity_data": sorted({Path(p).name for p in parity_dirs}),
        "quantization": quantization,
        "int8_usable": int8_usable,
        "int8_error": int8_error,
        "machine": _machine(),
        "throughput_batch": options.bench_batch,
        "throughput_threads": options.bench_threads,
        "notes": notes,
        "options": {
            k: (Path(v).name if isinstance(v, Path) else [Path(p).name for p in v] if isinstance(v, list) else v)
            for k, v in options.__dict__.items()
        },
    }
    write_json(out_dir / REPORT_NAME, report)
    with atomic_path(out_dir / CARD_NAME) as handle:
        handle.write(render_model_card(report))
    return report
