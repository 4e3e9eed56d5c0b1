"""idc-infer on a Dask cluster: one task per patient, the same engine on every worker, reports written by the client.

``--dask tcp://HOST:8786`` joins a running scheduler (``dask-scheduler`` and ``dask-worker`` on any machines,
or a SLURM/PBS/Kubernetes cluster started with dask-jobqueue / dask-kubernetes); ``--dask local:N`` starts a
LocalCluster of N worker processes here. Only this module imports dask (the ``[dask]`` extra), and only when
``--dask`` is given.

A worker scores its patient with ``engine.score_patient`` into a private temporary folder and returns the
files it wrote (CSV, GeoJSON, mosaic, resume state) as bytes; the client writes them into ``--out``
atomically, the state file last, so ``--resume``, atomic writes and summary.csv stay exactly as on one
machine, and the outputs are byte-identical to a single-machine run. Inputs (and a ``--model`` file) must
be readable on every worker at the same path: a shared file system. A worker that cannot read them
says so, naming the path and itself.

Faults: a worker that dies mid-patient has its task rescheduled by Dask (``distributed.scheduler.
allowed-failures`` times); a patient that fails every try gets its rows with status ``worker_failed`` and
no resume state (``--resume`` tries it again), and the run goes on. Ctrl-C cancels the tasks; finished
patients are kept.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from .discover import STATE_DIR, Patient, SkipCounter
from .engine import (
    PATCH_COLUMNS,
    PATIENT_SUFFIXES,
    PatchRow,
    PatientTally,
    RunResult,
    RunSettings,
    _completed_tally,
    score_patient,
    worker_threads,
    write_summary,
)
from .errors import IdcError
from .files import CsvOut, atomic_path, safe_file_stem
from .model import LoadedModel, load_model, sha256_of
from .schema import STATUS_WORKER_FAILED

log = logging.getLogger(__name__)

DASK_EXTRA_HINT = "--dask needs the [dask] extra: pip install 'idc[dask]' (dask[distributed]), here and on every worker"
TASK_RETRIES = 1  # an exception inside a task is retried once; a worker's death is retried by the scheduler


class DaskError(IdcError, RuntimeError):
    """The cluster cannot be reached or started."""


class WorkerInputError(IdcError):
    """A worker cannot read a patient's inputs or the model: a shared file system is missing."""


@dataclass
class PatientOutcome:
    """What a worker sends back for one patient: the files score_patient wrote, by name, and its tally."""

    patient_id: str
    worker: str
    files: dict[str, bytes] = field(default_factory=dict)
    tally_state: dict | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    slide_stats: dict | None = None
    elapsed_s: float = 0.0
    error: str | None = None  # the worker could not read the inputs: no retry helps


def parse_address(spec: str) -> tuple[str, int | None]:
    """('local', N) for local:N, else ('remote', None) for a scheduler address; ValueError when neither."""
    if spec.startswith("local:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--dask {spec}: local:N needs a number of worker processes N >= 1")
        return "local", int(count)
    if "://" not in spec and ":" not in spec:
        raise ValueError(f"--dask {spec}: give a scheduler address (tcp://HOST:8786) or local:N")
    return "remote", None


def connect(spec: str):
    """(client, cluster or None) for --dask; DaskError with a clear message when that fails."""
    kind, n_workers = parse_address(spec)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise DaskError(DASK_EXTRA_HINT) from None
    # Dask's own INFO lines (scheduler start, workers registering) are noise in idc's console unless -vv
    logging.getLogger("distributed").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    try:
        if kind == "local":
            import dask

            # one patient at a time per worker: a worker that dies then costs only its own patient a try
            with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
                cluster = LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",
                    silence_logs=logging.ERROR,
                )
            return Client(cluster), cluster
        return Client(spec, timeout="15s"), None
    except (OSError, TimeoutError) as exc:
        raise DaskError(f"cannot reach the Dask scheduler at {spec}: {exc}") from None


# --- worker side ------------------------------------------------------------------------------------------

_MODELS: dict[tuple[str, int], LoadedModel] = {}


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "this process"


def _check_inputs(patient: Patient, worker: str) -> None:
    root = getattr(patient, "slide", None) or patient.root
    if root is not None:
        if not Path(root).exists():
            raise WorkerInputError(
                f"worker {worker} cannot read {root}: inputs must lie on a file system that "
                "every worker mounts at the same path"
            )
        return
    for path in (patient.paths or [])[:1]:
        if not Path(path).parent.exists():
            raise WorkerInputError(
                f"worker {worker} cannot read {Path(path).parent}: listed paths must lie on a "
                "file system that every worker mounts at the same path"
            )


def _model_on_worker(path: str, sha256: str, threads: int, worker: str) -> LoadedModel:
    """The model, loaded once per worker process (by sha256) and kept for its next patients."""
    model = _MODELS.get((sha256, threads))
    if model is None:
        if not Path(path).exists():
            raise WorkerInputError(
                f"worker {worker} cannot read the model {path}: install idc (for the shipped "
                "model) or put --model on a shared file system"
            )
        if sha256_of(Path(path)) != sha256:
            raise WorkerInputError(
                f"worker {worker}: {path} is not the model the client loaded (sha256 differs): "
                "install the same idc version on every worker"
            )
        model = load_model(Path(path), threads=1, spin=False)  # one onnxruntime thread per scoring thread
        _MODELS[(sha256, threads)] = model
    return model


def score_on_worker(model_path: str, model_sha256: str, patient: Patient, settings: RunSettings) -> PatientOutcome:
    """One task: score a patient with the single-machine engine into a temporary folder; return its files."""
    worker = _worker_address()
    start = time.perf_counter()
    try:
        _check_inputs(patient, worker)
        model = _model_on_worker(model_path, model_sha256, settings.threads, worker)
    except WorkerInputError as exc:
        return PatientOutcome(patient.patient_id, worker, error=str(exc))
    with tempfile.TemporaryDirectory(prefix="idc-worker-") as tmp:
        local = replace(settings, out_dir=Path(tmp), resume=False)
        skipped = SkipCounter()
        with ThreadPoolExecutor(max_workers=worker_threads(settings.threads), thread_name_prefix="score") as pool:
            tally = score_patient(model, patient, local, pool, skipped)
        files = {}
        for path in Path(tmp).rglob("*"):
            if path.is_file() and not path.name.endswith(".tmp"):
                files[path.relative_to(tmp).as_posix()] = path.read_bytes()
    stats = getattr(patient, "stats", None)
    return PatientOutcome(
        patient.patient_id,
        worker,
        files,
        tally.to_state(),
        dict(skipped.counts),
        stats.record() if stats is not None else None,
        time.perf_counter() - start,
    )


# --- client side ------------------------------------------------------------------------------------------


def write_outcome(out_dir: Path, stem: str, outcome: PatientOutcome) -> None:
    """The worker's files into --out, each atomically; what it did not write (a mosaic of a patient without
    coordinates) is removed, as a single-machine run does; the resume state goes last."""
    state_name = f"{STATE_DIR}/{stem}.json"
    for suffix in PATIENT_SUFFIXES:
        if f"{stem}{suffix}" not in outcome.files:
            (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)
    for name, data in sorted(outcome.files.items(), key=lambda item: item[0] == state_name):
        with atomic_path(out_dir / name, "wb") as handle:
            handle.write(data)


def write_failure(out_dir: Path, stem: str, patient: Patient, message: str, threshold: float) -> PatientTally:
    """A patient no worker could score: a row per input (status worker_failed) and no resume state."""
    from .engine import ScoredPatch, patch_row
    from .preprocess import Decoded

    tally = PatientTally()
    for suffix in PATIENT_SUFFIXES[1:]:
        (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)
    (out_dir / STATE_DIR / f"{stem}.json").unlink(missing_ok=True)
    with atomic_path(out_dir / f"{stem}.csv", newline="") as handle:
        out = CsvOut(handle, PATCH_COLUMNS)
        items: list = []
        if getattr(patient, "slide", None) is None:  # a slide is not read again here: that may be what failed
            try:
                items = list(patient.iter_paths(SkipCounter()))
            except Exception:  # noqa: BLE001 - the one row below says what happened
                items = []
            finally:
                patient.finish()
        for item in items:
            row = patch_row(ScoredPatch(item, Decoded(STATUS_WORKER_FAILED, message), None), patient, threshold)
            out.row(row)
            tally.add(None, None, row.label, None, STATUS_WORKER_FAILED)
        if not items:
            where = getattr(patient, "slide", None) or patient.root or "the listed paths"
            out.row(PatchRow(str(where), status=STATUS_WORKER_FAILED, message=message))
            tally.add(None, None, None, None, STATUS_WORKER_FAILED)
    return tally


def run_patients_on_dask(
    client,
    model: LoadedModel,
    patients: list[Patient],
    settings: RunSettings,
    progress: Callable[[int], None] = lambda n: None,
    on_patient_done: Callable[[str], None] = lambda pid: None,
) -> tuple[RunResult, dict]:
    """engine.run_patients, one Dask task per patient; returns the result and the record for run.json."""
    from distributed import as_completed

    start = time.perf_counter()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    tallies: dict[int, PatientTally] = {}
    resumed: list[str] = []
    skipped = SkipCounter()
    where: dict[str, str] = {}
    failed: dict[str, str] = {}
    futures = {}
    for index, patient in enumerate(patients):
        stem = safe_file_stem(patient.patient_id)
        tally = _completed_tally(settings, stem, patient, model) if settings.resume else None
        if tally is not None:
            resumed.append(patient.patient_id)
            tallies[index] = tally
            skipped.counts.update(tally.skipped)
            progress(tally.n_patches)
            on_patient_done(patient.patient_id)
            continue
        future = client.submit(
            score_on_worker,
            str(model.path),
            model.sha256,
            patient,
            settings,
            key=f"idc-patient-{index}-{stem}",
            retries=TASK_RETRIES,
            pure=False,
        )
        futures[future] = index
    try:
        for future in as_completed(list(futures)):
            index = futures[future]
            patient = patients[index]
            stem = safe_file_stem(patient.patient_id)
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker after every retry, or the task's own error
                message = f"no worker could score this patient ({type(exc).__name__}: {exc})"
                outcome = PatientOutcome(patient.patient_id, "none", error=message)
            if outcome.error is not None:
                log.error("patient %s: %s", patient.patient_id, outcome.error)
                tallies[index] = write_failure(settings.out_dir, stem, patient, outcome.error, settings.threshold)
                failed[patient.patient_id] = outcome.error
            else:
                write_outcome(settings.out_dir, stem, outcome)
                tallies[index] = PatientTally.from_state(outcome.tally_state)
                for reason, count in outcome.skipped.items():
                    skipped.skip(reason, count)
                if outcome.slide_stats is not None and hasattr(patient, "stats"):
                    patient.stats.__dict__.update(outcome.slide_stats)
                log.info(
                    "patient %s: %d patches on %s in %.1f s",
                    patient.patient_id,
                    tallies[index].n_patches,
                    outcome.worker,
                    outcome.elapsed_s,
                )
            where[patient.patient_id] = outcome.worker
            progress(tallies[index].n_patches)
            on_patient_done(patient.patient_id)
    except BaseException:  # Ctrl-C: nothing more is scored; what was written stays, --resume goes on
        client.cancel(list(futures))
        raise
    ordered = [tallies[i] for i in range(len(patients))]
    rows, cohort = write_summary(model, patients, ordered, settings)
    info = client.scheduler_info()
    record = {
        "scheduler": info.get("address"),
        "workers": len(info.get("workers", {})),
        "per_patient_worker": where,
        "worker_failed": failed,
        "task_retries": TASK_RETRIES,
    }
    return RunResult(rows, cohort, skipped, resumed, time.perf_counter() - start), record


def default_threads_per_worker(n_workers: int) -> int:
    """--dask local:N on this machine: the cores shared out among the N workers."""
    return max(1, (os.cpu_count() or 1) // n_workers)
