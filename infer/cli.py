"""The ``idc-infer`` command: score patient directories with an ONNX model and write reports."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from .options import DEFAULT_MIN_SHARPNESS, slide_options
from .precision import PRECISIONS

log = logging.getLogger("idc_infer")

EXIT_FAILED_PATCHES = EXIT_FAILED  # --strict and a patch not scored, or reports not written

HELP_EPILOG = f"""\b
Exit codes:
  {EXIT_OK}    reports written (failed patches are listed in their rows)
  {EXIT_FAILED_PATCHES}    --strict and at least one patch could not be scored, or reports could not be written
  {EXIT_USAGE}    usage error: bad path, model or option
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); completed patients are kept, rerun with --resume

Research use only: outputs are not a diagnosis.
"""


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _shipped_model(precision: str, threads: int, load):
    """The shipped model of --precision (auto: the faster of fp32 and int8 on this machine, timed once
    and cached) and the record of the choice for run.json."""
    from .model import ModelError, default_model_path, shipped_model_path
    from .precision import choose

    fp32 = default_model_path()
    if precision == "auto":
        return choose(fp32, shipped_model_path("int8"), threads, load)
    path = fp32 if precision == "fp32" else shipped_model_path("int8")
    if path is None:
        raise ModelError(
            "no int8 model is shipped (it failed its accuracy gate at export, see MODEL_CARD.md); "
            "use --precision fp32 or auto"
        )
    return load(path), {"requested": precision, "chosen": precision}


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = (
        logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    from .files import stderr_log_handler

    logging.basicConfig(level=level, handlers=[stderr_log_handler()])


def _echo(text: str, err: bool = False) -> None:
    """click.echo of a line that may hold a patient id or a path (files.printable)."""
    from .files import printable

    click.echo(printable(text), err=err)


def _report_folder(_ctx, _param, value):
    # an empty --out ("", e.g. an unset shell variable) would scatter reports over the current folder
    if not value.strip():
        raise click.BadParameter("an empty name is not a folder for reports; name one, e.g. --out idc-reports")
    return Path(value)


def _finite_threshold(_ctx, _param, value):
    if value is not None and value != value:  # click's FloatRange lets NaN through
        raise click.BadParameter(f"{value} is not a number in [0, 1]")
    return value


def _dask_address(_ctx, _param, value):
    if value is None:
        return None
    from .distributed import parse_address

    try:
        parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _count_in_background(bar, patients) -> None:
    """Give the progress bar its total once the patients' files are counted (a directory walk, in a daemon
    thread: scoring starts at once). Slides are left out: their tiles are known only after tissue detection,
    so a run with slides keeps a bar without a total."""
    import threading

    from .discover import SkipCounter

    if any(getattr(p, "slide", None) is not None for p in patients):
        return

    def count() -> None:
        total = 0
        for patient in patients:
            total += sum(1 for _ in patient.iter_paths(SkipCounter()))
        bar.total = total
        bar.refresh()

    threading.Thread(target=count, name="count-files", daemon=True).start()


def _announce(model, quiet: bool, precision: dict | None = None) -> None:
    contract = model.contract
    lines = [
        f"idc-infer: model {model.path.name} (sha256 {model.sha256[:12]}), threshold {contract.threshold:.3f}",
        f"idc-infer: trained on {contract.describe_training()}",
    ]
    precision = precision or {}
    rates = precision.get("patches_per_s")
    if rates:
        lines.append(
            f"idc-infer: precision {precision['chosen']}: timed here, fp32 {rates['fp32']:.0f} vs int8 "
            f"{rates['int8']:.0f} patches/s{' (cached)' if precision.get('cached') else ''}"
        )
    if contract.demo_warning:
        lines.insert(0, "!" * 72)
        lines.insert(1, f"!! {contract.demo_warning}")
        lines.append("!" * 72)
    if contract.failed_gate:
        lines.append(
            "idc-infer: WARNING this model FAILED its int8 accuracy gate (used because of "
            "--allow-failed-gate); its results may differ from the model that was evaluated"
        )
    lines.append("idc-infer: RESEARCH USE ONLY - not for diagnosis.")
    for line in lines:
        if not quiet or contract.is_demo or contract.failed_gate:
            click.echo(line, err=True)


@click.command(epilog=HELP_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--from-list",
    "from_list",
    type=click.File("r", encoding="utf-8-sig"),
    help="Text file listing patch paths, one per line ('-' for stdin); relative paths are taken from "
    "the current folder.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="Which shipped model to run: auto times fp32 and int8 briefly on this machine (once; cached) "
    "and runs the faster; fp32 or int8 force one. Not with --model.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    help="ONNX model exported by idc-export [default: the model shipped with idc].",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="idc-reports",
    callback=_report_folder,
    show_default=True,
    help="Directory for the reports.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    callback=_finite_threshold,
    help="prob_idc at or above which a patch counts as IDC [default: the model's].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=64,
    show_default=True,
    help="Patches a worker decodes at once (at most 256 are taken); the model runs 16 at a time, where "
    "onnxruntime is fastest on a CPU and its memory stays small.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=_default_threads,
    show_default="min(4, cores)",
    help="Workers, each decoding and scoring with one onnxruntime thread (threads or processes: --parallel).",
)
@click.option(
    "--parallel",
    type=click.Choice(["auto", "threads", "processes"]),
    default="auto",
    show_default=True,
    help="threads: the workers are threads of this process, sharing each patient's batches; processes: worker "
    "processes (at most one a core), one patient at a time each (no shared Python lock: faster on a cohort). "
    "auto: processes for a cohort whose patients share out evenly, threads for one patient, a slide or a small run.",
)
@click.option(
    "--allow-failed-gate",
    is_flag=True,
    help="Use an int8 model that failed its accuracy gate at export (refused otherwise).",
)
@click.option("--overwrite", is_flag=True, help="Replace reports already in --out.")
@click.option("--resume", is_flag=True, help="Keep patients already completed with the same model and threshold.")
@click.option("--strict", is_flag=True, help="Exit 1 if any patch could not be scored.")
@click.option(
    "--review/--no-review",
    default=True,
    show_default=True,
    help="Also write review outputs: <patient_id>_mosaic.png, <patient_id>.geojson, report.html.",
)
@click.option(
    "--review-scale",
    type=click.FloatRange(0.02, 1.0),
    default=0.25,
    show_default=True,
    help="Mosaic pixels per slide pixel (0.25: a 50 px patch becomes 12-13 px).",
)
@slide_options
@click.option(
    "--qc/--no-qc",
    default=True,
    show_default=True,
    help="Quality control: glass/blank patches get status background, out-of-focus ones blurred; "
    "neither is scored nor counted in the fractions.",
)
@click.option(
    "--min-sharpness",
    type=click.FloatRange(0.0),
    default=DEFAULT_MIN_SHARPNESS,
    show_default=True,
    help="Variance of the Laplacian below which a tissue patch is blurred.",
)
@click.option(
    "--geojson-scale",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help="Patch folders: multiply file-name x, y and patch size by this in the GeoJSON, so it lands on the "
    "scan's level 0 (16 for the public set's 2.5x patches of 40x scans). Slides are in level-0 "
    "pixels already.",
)
@click.option(
    "--dask",
    "dask_address",
    default=None,
    callback=_dask_address,
    metavar="ADDRESS",
    help="Run on a Dask cluster, one task per patient: tcp://HOST:8786 (a running dask-scheduler) or local:N "
    "(N worker processes here). Inputs must be readable at the same paths on every worker. Needs idc[dask].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, warnings only.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(__version__, prog_name="idc-infer")
def main(
    inputs,
    from_list,
    precision,
    model_path,
    out_dir,
    threshold,
    batch_size,
    threads,
    parallel,
    allow_failed_gate,
    overwrite,
    resume,
    strict,
    review,
    review_scale,
    mpp,
    patch_mpp,
    qc,
    min_tissue,
    min_sharpness,
    geojson_scale,
    dask_address,
    quiet,
    verbose,
):
    """Score histopathology patches for IDC and write per-patient reports.

    INPUTS are patient directories (PNG patches, flat or in 0/ and 1/ folders), cohort
    roots holding patient directories, or whole-slide images (.svs, .ndpi, .tif...: each
    slide is a patient, tiled at the model's scale; needs idc[slides]). Writes
    <patient_id>.csv, summary.csv and run.json into --out, and unless --no-review the
    review outputs: a tissue mosaic with the IDC heatmap and a QuPath GeoJSON per patient,
    and report.html for the run.
    """
    from .discover import SkipCounter, duplicate_ids, patients_from_dirs, patients_from_list

    _setup_logging(verbose, quiet)
    started = time.time()
    if not inputs and from_list is None:
        raise click.UsageError("give at least one patient directory or cohort root, or --from-list FILE")
    if overwrite and resume:
        raise click.UsageError("--overwrite and --resume contradict each other; pick one")
    # the patient folders first: listing them needs none of the heavy imports below
    list_skips = SkipCounter()
    folders = [p for p in inputs if p.is_dir()]
    patients = patients_from_dirs(folders, exclude=[out_dir], skipped=list_skips)
    if parallel != "threads" and threads > 1 and not dask_address and (len(patients) > 1 or from_list is not None):
        from . import forkserver

        # worker processes may be chosen for these patients: their fork server imports numpy, OpenCV and
        # onnxruntime on another core while this process does the same (a small or resumed run may keep threads)
        forkserver.start()
    from .engine import RunSettings, clear_previous_run, existing_reports
    from .files import RESEARCH_NOTICE, FolderBusyError, folder_lock
    from .model import ModelError, load_model
    from .processes import WorkerProcessError
    from .run_record import console_summary, run_record, write_run_files
    from .slides import SLIDE_SUFFIXES, SlideError, is_slide_path, slide_patients

    if (
        dask_address
        and dask_address.startswith("local:")
        and click.get_current_context().get_parameter_source("threads") == click.core.ParameterSource.DEFAULT
    ):
        from .distributed import default_threads_per_worker

        threads = default_threads_per_worker(int(dask_address.split(":", 1)[1]))  # the cores shared out
    if model_path is not None and precision != "auto":
        raise click.UsageError(
            f"--precision {precision} picks one of the shipped files; --model {model_path} "
            "names a file itself: give one or the other"
        )
    # one onnxruntime thread per session run: the engine's --threads workers each decode and score a batch
    # in parallel (1.3x decoding in one thread and running onnxruntime on two); no spin-waiting
    load = lambda path: load_model(path, threads=1, spin=False)  # noqa: E731
    try:
        if model_path is not None:
            model, precision_record = load(model_path), {"requested": "--model", "chosen": "the file given"}
        else:
            model, precision_record = _shipped_model(precision, threads, load)
    except ModelError as exc:
        raise click.BadParameter(str(exc), param_hint="--model" if model_path is not None else "--precision") from None
    if model.contract.failed_gate and not allow_failed_gate:
        raise click.BadParameter(
            f"{model.path} failed its int8 accuracy gate at export (see its contract); use the "
            "fp32 model, or pass --allow-failed-gate to use it anyway",
            param_hint="--model",
        )
    effective_threshold = model.contract.threshold if threshold is None else threshold

    slide_paths = [p for p in inputs if not p.is_dir()]
    for path in slide_paths:
        if not is_slide_path(path):
            raise click.BadParameter(
                f"{path} is a file, not a slide ({', '.join(SLIDE_SUFFIXES)}): give patient "
                "folders, slides, or patch files with --from-list",
                param_hint="INPUTS",
            )
    if slide_paths:
        try:
            patients += slide_patients(slide_paths, model.contract, mpp, patch_mpp, min_tissue)
        except SlideError as exc:
            raise click.BadParameter(str(exc), param_hint="--patch-mpp") from None
    if from_list is not None:
        base = Path.cwd()  # relative paths as a user typed them: from where the command runs, not the list's folder
        try:
            patients += patients_from_list(from_list, base, list_skips)
        except ValueError as exc:  # not UTF-8 text, for one
            raise click.BadParameter(str(exc), param_hint="--from-list") from None
    out_resolved = out_dir.resolve()
    for given in inputs:
        if out_resolved == Path(given).resolve():
            # its .idc-state would make the next run take the input for a folder of reports and skip it
            raise click.BadParameter(
                f"{out_dir} is an input folder itself; write the reports to a folder of "
                "their own (e.g. its subfolder idc-reports)",
                param_hint="--out",
            )
    for patient in patients:
        if patient.root is not None and out_resolved.is_relative_to(patient.root.resolve()):
            raise click.BadParameter(
                f"{out_dir} lies inside the folder of patient {patient.patient_id} "
                f"({patient.root}): its reports would sit among the patient's patches; "
                "choose a folder outside it",
                param_hint="--out",
            )
    from .engine import COHORT_ID

    if any(patient.patient_id == COHORT_ID for patient in patients):
        raise click.UsageError(
            f"a patient folder is named {COHORT_ID!r}, the name of summary.csv's row for the whole "
            "cohort: rename the folder"
        )
    dupes = duplicate_ids(patients)
    if dupes:
        raise click.UsageError(f"patient id(s) given more than once: {', '.join(dupes[:10])}")
    if not patients:
        raise click.UsageError("no patient directories found in the inputs")
    log.info("%d patient(s) to score with %s, threshold %.4f", len(patients), model.path, effective_threshold)

    try:  # held until the command ends: click closes its resources on return, error and sys.exit alike
        click.get_current_context().with_resource(folder_lock(out_dir))
    except FolderBusyError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    except OSError as exc:
        raise click.BadParameter(f"cannot write into {out_dir}: {exc}", param_hint="--out") from None
    if existing_reports(out_dir) and not (overwrite or resume):
        raise click.UsageError(f"{out_dir} already holds idc reports; pass --resume to continue or --overwrite")
    if overwrite:
        clear_previous_run(out_dir)

    _announce(model, quiet, precision_record)
    from tqdm import tqdm

    show_bar = not quiet and sys.stderr.isatty()
    bar = tqdm(total=None, unit="patch", disable=not show_bar, file=sys.stderr, dynamic_ncols=True)
    if show_bar:
        _count_in_background(bar, patients)
    done = {"patients": 0}

    def patient_done(_pid: str) -> None:
        done["patients"] += 1
        bar.set_postfix_str(f"patients {done['patients']}/{len(patients)}")

    sink_factories = []
    if review:
        from .review import review_sink_factories

        sink_factories = review_sink_factories(review_scale, geojson_scale)
    from .quality import QualityControl

    quality = QualityControl(min_tissue, min_sharpness) if qc else None
    settings = RunSettings(
        out_dir,
        effective_threshold,
        batch_size,
        threads,
        resume,
        sink_factories=sink_factories,
        qc=quality,
        output_settings={
            "review": review,
            "review_scale": review_scale if review else None,
            "geojson_scale": geojson_scale if review else None,
            "qc": quality.settings() if quality else None,
            "mpp": mpp,
            "patch_mpp": patch_mpp,
        },
    )
    dask_record = None
    parallel_record = {"requested": parallel, "chosen": "dask", "workers": None, "why": "--dask"}
    try:
        if dask_address:
            from .distributed import DaskError, connect, run_patients_on_dask

            try:
                client, cluster = connect(dask_address)
            except DaskError as exc:
                bar.close()
                raise click.BadParameter(str(exc), param_hint="--dask") from None
            if cluster is not None:
                click.get_current_context().call_on_close(cluster.close)
            click.get_current_context().call_on_close(client.close)  # runs first: closes are last in, first out
            result, dask_record = run_patients_on_dask(
                client, model, patients, settings, progress=bar.update, on_patient_done=patient_done
            )
        else:
            from .processes import run_patients_parallel

            result, parallel_record = run_patients_parallel(
                model, patients, settings, parallel, progress=bar.update, on_patient_done=patient_done
            )
    except KeyboardInterrupt:
        bar.close()
        _echo(f"idc-infer: interrupted; completed patients are kept in {out_dir}, rerun with --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:  # a report open in Excel on Windows, a full disk, a read-only --out
        bar.close()
        _echo(
            f"idc-infer: cannot write reports in {out_dir}: {exc}; completed patients are kept, "
            "fix the cause and rerun with --resume",
            err=True,
        )
        sys.exit(EXIT_FAILED_PATCHES)
    except WorkerProcessError as exc:
        bar.close()
        _echo(f"idc-infer: {exc}", err=True)
        sys.exit(EXIT_FAILED_PATCHES)
    finally:
        bar.close()

    arguments = {
        "inputs": [str(p) for p in inputs],
        "from_list": None if from_list is None else from_list.name,
        "out": str(out_dir),
        "threshold": effective_threshold,
        "batch_size": batch_size,
        "threads": threads,
        "resume": resume,
        "overwrite": overwrite,
        "strict": strict,
        "review": review,
        "review_scale": review_scale if review else None,
        "geojson_scale": geojson_scale,
        "mpp": mpp,
        "patch_mpp": patch_mpp,
        "quality_control": quality.settings() if quality else None,
        "dask": dask_address,
        "parallel": parallel,
    }
    record = run_record(
        model,
        effective_threshold,
        precision_record,
        arguments,
        patients,
        result,
        list_skips,
        dask_record,
        started,
        parallel_record,
    )
    try:
        write_run_files(out_dir, record, result.summary_rows, review)
    except OSError as exc:  # a full disk, a read-only folder: the patients' reports are written already
        _echo(
            f"idc-infer: cannot write run.json or report.html in {out_dir}: {exc}; the patients' CSVs and "
            "summary.csv are complete; fix the cause and rerun with --resume",
            err=True,
        )
        sys.exit(EXIT_FAILED_PATCHES)
    for line in console_summary(result.summary_rows, model.contract, effective_threshold):
        _echo(line)
    _echo(f"reports in {out_dir} ({RESEARCH_NOTICE})")

    cohort = result.cohort
    n_failed = cohort.n_failed
    if n_failed:
        click.echo(f"idc-infer: {n_failed} patch(es) could not be scored; see the status column", err=True)
    if strict and n_failed:
        sys.exit(EXIT_FAILED_PATCHES)
