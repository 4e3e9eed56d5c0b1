"""idc-infer's patients shared out among worker processes on this machine, one patient at a time each.

In the threaded engine the worker threads share Python's lock: each patch's Python work (reading, checks, rows)
waits for the lock while onnxruntime and the decoder let it go and take it back many times a patch (150,000
hand-overs on idc-real), and on 2 cores 1.7-1.8 of them were busy. A worker process runs the same engine
(engine.score_patient) in one thread, with a lock of its own, and writes the patient's CSV, review files and
resume state into --out itself, atomically, the state last, as the threaded engine does: outputs are
byte-identical, --resume and the folder lock work as before. This process lists the patients, hands them out
largest first, reports progress per patient and writes summary.csv. On Linux the workers fork from a fork server
that idc-infer starts as it starts (forkserver.py), elsewhere they are spawned.

``--parallel auto`` takes processes for a cohort whose work shares out evenly (at least as many patients as
workers, none larger than a worker's share, and enough patches to be worth starting the processes); one patient,
a slide (tiled in worker threads) and small runs keep the threads.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from . import forkserver
from .discover import Patient, SkipCounter
from .engine import (
    InlineExecutor,
    PatientTally,
    RunResult,
    RunSettings,
    _completed_tally,
    run_patients,
    score_patient,
    write_summary,
)
from .errors import IdcError
from .files import remove_stale_temp_files, safe_file_stem, stderr_log_handler
from .forkserver import cores as _cores
from .model import LoadedModel, load_model

log = logging.getLogger(__name__)

# below this many patches a worker, starting the processes (Python, numpy, OpenCV, onnxruntime and the model in
# each: ~0.3 s forked from the fork server, ~0.6 s spawned, on 2 cores) costs more than sharing Python's lock does
MIN_PATCHES_PER_PROCESS = 1000


class WorkerProcessError(IdcError, RuntimeError):
    """A worker process died (killed, out of memory) or could not start."""


@dataclass
class Plan:
    mode: str  # "threads" or "processes"
    why: str
    sizes: dict[int, int]  # items per patient to score, by index (processes only)

    def record(self, requested: str, workers: int) -> dict:
        return {"requested": requested, "chosen": self.mode, "workers": workers, "why": self.why}


def _count(patient: Patient) -> int:
    """The patient's items; the walk's warnings (an unreadable folder) are left to the walk that scores them."""
    quiet = logging.getLogger("idc_infer.discover")
    silence = lambda record: False  # noqa: E731
    quiet.addFilter(silence)
    try:
        return sum(1 for _ in patient.iter_paths(SkipCounter()))
    finally:
        quiet.removeFilter(silence)
        patient.finish()


def _threads_because(requested: str, workers: int, patients: list[Patient], todo: list[int]) -> str | None:
    """Why the patients ``todo`` are scored in threads, where that needs no look at their files."""
    if requested == "threads":
        return "--parallel threads"
    if workers < 2:
        return "one worker"
    if not todo:
        return "no patient left to score"
    if any(hasattr(patients[i], "slide") for i in todo):
        return "a slide is tiled and scored in worker threads"
    if requested == "auto" and len(todo) < workers:
        return f"{len(todo)} patient(s) to score for {workers} workers"
    return None


def plan(requested: str, workers: int, patients: list[Patient], todo: list[int]) -> Plan:
    """How to score the patients ``todo`` (indexes into ``patients``): in threads or in processes, and why."""
    because = _threads_because(requested, workers, patients, todo)
    if because is not None:
        return Plan("threads", because, {})
    sizes = {i: _count(patients[i]) for i in todo}
    if requested == "processes":
        return Plan("processes", "--parallel processes", sizes)
    total, largest = sum(sizes.values()), max(sizes.values(), default=0)
    if total < MIN_PATCHES_PER_PROCESS * workers:
        return Plan("threads", f"{total} patches: too few to be worth starting {workers} processes", sizes)
    if largest * workers > total:
        return Plan("threads", f"one patient holds {largest} of the {total} patches: more than a worker's share", sizes)
    return Plan("processes", f"{len(todo)} patients, {total} patches, the largest {largest}", sizes)


# --- in a worker process ----------------------------------------------------------------------------------

_MODEL: list[LoadedModel] = []
_START_ERROR: list[str] = []  # why this worker could not load the model: its first task says so


def _start_worker(model_path: str, sha256: str, log_level: int) -> None:
    """A worker process's start: Ctrl-C is the parent's to handle (it stops the workers); the worker ends when
    the parent does; the parent's log level; the model, checked to be the file the parent loaded; ISA-L's
    inflate (one decoding thread here). A model that cannot be loaded is reported by the first task, as a
    message: an exception here would have the pool print its traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    logging.basicConfig(level=log_level, handlers=[stderr_log_handler()])
    from .preprocess import inflate_png_here

    inflate_png_here()
    try:
        model = load_model(Path(model_path), threads=1, spin=False)
    except Exception as exc:  # noqa: BLE001 - ModelError, OSError...: said by the first task, in one line
        _START_ERROR.append(f"a worker process could not load the model {model_path}: {exc}")
        return
    if model.sha256 != sha256:
        _START_ERROR.append(f"{model_path} changed while idc-infer was starting (its sha256 differs)")
        return
    _MODEL.append(model)


def _exit_with_parent() -> None:
    """End this worker as soon as idc-infer's process is gone (killed, out of memory): an orphan would go on
    writing into --out without the folder's lock. Its half-written temp files are removed by the next run."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _score_in_worker(patient: Patient, settings: RunSettings) -> tuple[dict, dict, dict, float | None]:
    """One patient, scored in this process's one thread; its files are in --out when this returns. Returns its
    tally, skipped files, summary.csv row (computed here: the parent's time is the run's tail) and this worker's
    peak RSS so far."""
    if _START_ERROR:
        raise WorkerProcessError(_START_ERROR[0])
    skipped = SkipCounter()
    model = _MODEL[0]
    tally = score_patient(model, patient, settings, InlineExecutor(), skipped)
    row = tally.summary_row(patient.patient_id, settings.threshold, model.sha256, model.contract)
    return tally.to_state(), dict(skipped.counts), row, _peak_rss_mb()


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (None where the resource module is missing: Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


# --- in idc-infer's own process ---------------------------------------------------------------------------


def run_patients_parallel(
    model: LoadedModel,
    patients: list[Patient],
    settings: RunSettings,
    requested: str = "auto",
    progress: Callable[[int], None] = lambda n: None,
    on_patient_done: Callable[[str], None] = lambda pid: None,
) -> tuple[RunResult, dict]:
    """engine.run_patients with the patients shared out among --threads worker processes where that is
    faster (``requested``: auto, threads or processes); returns the result and the record for run.json."""
    workers = min(max(1, settings.threads), _cores())  # processes: at most one a core
    because = _threads_because(requested, workers, patients, list(range(len(patients))))
    if because is not None:
        record = Plan("threads", because, {}).record(requested, max(1, settings.threads))
        return run_patients(model, patients, settings, progress, on_patient_done), record
    start = time.perf_counter()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    kept: dict[int, PatientTally] = {}
    pool, n_workers = None, 0  # the workers started: fewer than --threads for fewer patients or cores
    if not settings.resume:
        # the workers start now (forked from the fork server, or spawned: Python, numpy, OpenCV, onnxruntime, the
        # model) while this process counts the patients' files; a resumed run checks what is done first
        n_workers = min(workers, len(patients))
        pool = _start_pool(model, n_workers)
    try:
        for index, patient in enumerate(patients):
            stem = safe_file_stem(patient.patient_id)
            tally = _completed_tally(settings, stem, patient, model) if settings.resume else None
            if tally is not None:
                kept[index] = tally
        todo = [i for i in range(len(patients)) if i not in kept]
        chosen = plan(requested, workers, patients, todo)
        if pool is None and chosen.mode == "processes":
            n_workers = min(workers, len(todo))
            pool = _start_pool(model, n_workers)
    except BaseException:
        if pool is not None:
            _stop(pool, settings.out_dir)
        raise
    log.info("parallel: %s (%s)", chosen.mode, chosen.why)
    if chosen.mode == "threads" or pool is None:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)  # the workers exit as soon as they have started
        record = chosen.record(requested, max(1, settings.threads))
        return run_patients(model, patients, settings, progress, on_patient_done), record
    result, worker_peak_mb = _run_in_processes(
        pool, model, patients, settings, chosen.sizes, kept, progress, on_patient_done
    )
    result.elapsed_s = time.perf_counter() - start
    parent_peak_mb = _peak_rss_mb()
    record = chosen.record(requested, n_workers) | {  # memory: this process's peak and the largest worker's
        "parent_peak_rss_mb": None if parent_peak_mb is None else round(parent_peak_mb, 1),
        "worker_peak_rss_mb": None if worker_peak_mb is None else round(worker_peak_mb, 1),
    }
    return result, record


def _start_pool(model: LoadedModel, workers: int) -> ProcessPoolExecutor:
    """``workers`` worker processes, started now (one no-op task each starts one)."""
    # not a fork of this process: it holds threads (the progress bar's, an onnxruntime session) a fork would copy
    # mid-state; the workers fork from the fork server (started as idc-infer started), or are spawned
    forkserver.start()
    pool = ProcessPoolExecutor(
        max_workers=max(1, workers),
        mp_context=forkserver.worker_context(),
        initializer=_start_worker,
        initargs=(str(model.path), model.sha256, logging.getLogger("idc_infer").getEffectiveLevel()),
    )
    try:
        # the workers start (in submit) ignoring Ctrl-C, even before their initializer
        with forkserver.sigint_ignored():
            for _ in range(workers):
                pool.submit(int)
    except OSError as exc:  # no more processes allowed, no memory to start one
        pool.shutdown(wait=False, cancel_futures=True)
        raise WorkerProcessError(f"cannot start worker processes ({exc}); try --parallel threads") from None
    return pool


def _stop(pool: ProcessPoolExecutor, out_dir: Path) -> None:
    """Stop the workers at once and remove the temp files of what they were writing (under the folder lock)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)
    remove_stale_temp_files(out_dir)


def _run_in_processes(
    pool: ProcessPoolExecutor,
    model: LoadedModel,
    patients: list[Patient],
    settings: RunSettings,
    sizes: dict[int, int],
    kept: dict[int, PatientTally],
    progress: Callable[[int], None],
    on_patient_done: Callable[[str], None],
) -> tuple[RunResult, float | None]:
    tallies: dict[int, PatientTally] = {}
    skipped = SkipCounter()
    resumed: list[str] = []
    worker_peak_mb: float | None = None
    for index, tally in kept.items():
        tallies[index] = tally
        resumed.append(patients[index].patient_id)
        skipped.counts.update(tally.skipped)  # a kept patient's skipped files are still in run.json
        progress(tally.n_patches)
        on_patient_done(patients[index].patient_id)
    try:
        # largest first: the last patients to finish are small ones, so no worker idles long at the end
        order = sorted(sizes, key=lambda i: (-sizes[i], i))
        futures = {pool.submit(_score_in_worker, patients[i], settings): i for i in order}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = futures[future]
                tally_state, skip_counts, row, peak = future.result()
                if peak is not None:
                    worker_peak_mb = max(worker_peak_mb or 0.0, peak)
                tally = PatientTally.from_state(tally_state)
                tally.adopt_summary_row(
                    row, patients[index].patient_id, settings.threshold, model.sha256, model.contract
                )
                tallies[index] = tally
                skipped.counts.update(skip_counts)
                progress(tally.n_patches)
                on_patient_done(patients[index].patient_id)
    except BrokenProcessPool as exc:  # in submit or in a result: a worker died, or could not start
        _stop(pool, settings.out_dir)
        raise WorkerProcessError(
            f"a worker process died or could not start (killed, out of memory, or see its message above): {exc}; "
            "completed patients are kept, rerun with --resume (or --parallel threads)"
        ) from None
    except BaseException:  # Ctrl-C, a worker's error: no more patients; a patient half-written has no state
        _stop(pool, settings.out_dir)
        raise
    pool.shutdown(wait=True)
    ordered = [tallies[i] for i in range(len(patients))]
    rows, cohort = write_summary(model, patients, ordered, settings)
    return RunResult(rows, cohort, skipped, resumed, 0.0), worker_peak_mb
