"""What a run leaves besides the patients' reports: run.json (what was run, with what, and the counts),
report.html, and the summary printed on the console. Kept out of the command, which only parses options."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .files import RESEARCH_NOTICE, write_json
from .quantify import ESTIMATOR_COLUMNS, headline_of

if TYPE_CHECKING:
    from .contract import Contract
    from .discover import Patient, SkipCounter
    from .engine import RunResult
    from .model import LoadedModel


def versions() -> dict:
    """The versions that decide the numbers: idc, Python and the libraries that decode and score."""
    import cv2
    import numpy
    import onnxruntime

    return {
        "idc": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
    }


def run_record(
    model: LoadedModel,
    threshold: float,
    precision: dict | None,
    arguments: dict[str, Any],
    patients: list[Patient],
    result: RunResult,
    list_skips: SkipCounter,
    dask: dict | None,
    started_unix: float,
    parallel: dict | None = None,
) -> dict:
    """run.json's content: the model and how it was chosen, the arguments, slides, counts and timings."""
    cohort = result.cohort
    skipped = result.skipped.counts + list_skips.counts
    contract = model.contract
    return {
        "notice": RESEARCH_NOTICE,
        "versions": versions(),
        "model": {
            "path": str(model.path),
            "sha256": model.sha256,
            "demo": contract.is_demo,
            "demo_warning": contract.demo_warning,
            "trained_on": contract.describe_training(),
            "precision": precision,
            "fraction_headline": headline_of(contract, threshold),
            "fraction_headline_why": (contract.quantification or {}).get("headline_why"),
            "contract": contract.__dict__ | {"class_names": list(contract.class_names)},
        },
        "arguments": arguments,
        "dask": dask,
        "parallel": parallel,
        "slides": {
            p.patient_id: p.stats.record() | {"file": p.slide.name}  # type: ignore[attr-defined]
            for p in patients
            if hasattr(p, "stats")  # a slide (slides.SlidePatient)
        },
        "counts": {
            "patients": len(patients),
            "patients_resumed": len(result.resumed),
            "patches": cohort.n_patches,
            "scored": cohort.n_scored,
            "failed": cohort.n_failed,
            "background": cohort.n_background,
            "blurred": cohort.n_blurred,
            "skipped_files": sum(skipped.values()),
            "skipped_by_reason": dict(sorted(skipped.items())),
        },
        "timings": {
            "started_unix": started_unix,
            "scoring_elapsed_s": result.elapsed_s,
            "patches_per_s": (cohort.n_patches / result.elapsed_s) if result.elapsed_s > 0 else None,
        },
    }


def write_run_files(out_dir: Path, record: dict, summary_rows: list[dict], review: bool) -> None:
    """run.json, then report.html with review outputs (without, an earlier run's report.html is removed: it
    would link mosaics --resume has just removed). OSError passes to the caller."""
    write_json(out_dir / "run.json", record)
    if review:
        from .report import write_report_html

        write_report_html(out_dir, summary_rows, record)
    else:
        (out_dir / "report.html").unlink(missing_ok=True)


def console_summary(summary_rows: list[dict], contract: Contract, threshold: float) -> list[str]:
    """One tab-separated line per summary row: patches, failures and the headline fraction with its interval."""
    column = ESTIMATOR_COLUMNS[headline_of(contract, threshold)]
    lines = []
    for row in summary_rows:
        fraction, low, high = (row.get(column + suffix) for suffix in ("", "_ci95_low", "_ci95_high"))
        shown = (
            "n/a"
            if fraction is None or fraction != fraction
            else f"{fraction:.3f}" + ("" if low is None or low != low else f" [{low:.3f}-{high:.3f}]")
        )
        lines.append(
            f"{row['patient_id']}\tpatches {row['n_patches']}\tfailed {row['n_failed']}\t{column} {shown}"
            + (f"\t({row['notes']})" if row.get("notes") else "")
        )
    return lines
