"""Score patients: decode in worker threads, batch into onnxruntime, stream rows to reports.

Memory is bounded by batch size x lookahead, never by how many patches a directory holds:
paths are discovered lazily and each row is written to the patient's CSV as soon as it is known.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .contract import Contract
from .discover import STATE_DIR, UNREADABLE_DIRECTORY, Patient, SkipCounter
from .files import RESEARCH_NOTICE, CsvOut, atomic_path, safe_file_stem, write_csv
from .metrics import Confusion, safe_ratio, wilson_interval
from .model import LoadedModel, sha256_of
from .preprocess import Decoded, decode_file, file_stat_of, finish_batch, model_batch
from .quality import QualityControl
from .quantify import COLOUR_Z_LIMIT, FEW_PATCHES, colour_distance_sd, fraction_estimates
from .schema import (
    COHORT_ID,
    PATCH_COLUMNS,
    STATUS_BACKGROUND,
    STATUS_BLURRED,
    STATUS_MODEL_ERROR,
    STATUS_OK,
    SUMMARY_COLUMNS,
    PatchRow,
)

log = logging.getLogger(__name__)


@dataclass
class PatientTally:
    """Running counts for one patient (or the cohort), enough for every summary column."""

    n_patches: int = 0
    n_scored: int = 0
    n_idc: int = 0
    sum_prob: float = 0.0
    sum_prob_sq: float = 0.0
    sum_r: float = 0.0  # per-patch mean colour on [0, 1], summed: the patient's mean colour
    sum_g: float = 0.0
    sum_b: float = 0.0
    n_labelled: int = 0
    n_true_idc: int = 0
    n_unreadable_dirs: int = 0  # sub-folders that could not be listed: their patches are missing
    n_background: int = 0  # quality control: glass or blank, not scored and not failed
    n_blurred: int = 0
    slide_note: str = ""  # a slide's tiling (scale, tissue, glass) or why it could not be read; not merged
    skipped: dict = field(default_factory=dict)  # files seen but not scored, by reason (kept on --resume)
    tp: int = 0  # plain counters: this runs once per patch
    fp: int = 0
    tn: int = 0
    fn: int = 0
    # (what it was computed from, the contract, the row): summary_row's last result, computed by the writer thread
    # as the patient closes, so summary.csv does not wait ~1 ms a patient for the fractions' Monte Carlo at the end
    _summary: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def confusion(self) -> Confusion:
        return Confusion(self.tp, self.fp, self.tn, self.fn)

    @property
    def n_failed(self) -> int:
        """Patches that could not be scored (bad files, model errors); quality-control skips are not failures."""
        return self.n_patches - self.n_scored - self.n_background - self.n_blurred

    def add(
        self,
        prob: float | None,
        pred: int | None,
        label: int | None,
        colour: tuple[float, float, float] | None = None,
        status: str = STATUS_OK,
    ) -> None:
        """One patch; ``colour``: its mean R, G, B on [0, 1] (preprocess.patch_mean_colour, computed by the decoder)."""
        self.n_patches += 1
        if prob is None:
            self.n_background += status == STATUS_BACKGROUND
            self.n_blurred += status == STATUS_BLURRED
            return
        assert pred is not None  # a scored patch has a prediction
        self.n_scored += 1
        self.n_idc += pred
        self.sum_prob += prob
        self.sum_prob_sq += prob * prob
        if colour is not None:
            r, g, b = colour
            self.sum_r += r
            self.sum_g += g
            self.sum_b += b
        if label is not None:
            self.n_labelled += 1
            self.n_true_idc += label
            if label:
                self.tp += pred
                self.fn += 1 - pred
            else:
                self.fp += pred
                self.tn += 1 - pred

    def merge(self, other: PatientTally) -> None:
        for name in STATE_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def mean_colour(self) -> list[float] | None:
        if self.n_scored == 0:
            return None
        return [self.sum_r / self.n_scored, self.sum_g / self.n_scored, self.sum_b / self.n_scored]

    def notes(self, patient_id: str, contract: Contract, threshold: float) -> list[str]:
        """What a reviewer must know before reading this patient's fractions."""
        notes = [self.slide_note] if self.slide_note else []
        if self.n_background or self.n_blurred:
            notes.append(
                f"{self.n_background} background and {self.n_blurred} blurred patch(es) not scored "
                "(quality control): left out of the fractions"
            )
        if self.n_unreadable_dirs:
            notes.append(f"{self.n_unreadable_dirs} sub-folder(s) could not be read: their patches are missing here")
        if self.n_scored < FEW_PATCHES:
            notes.append(f"only {self.n_scored} scored patches: too few for a meaningful fraction")
        if patient_id in contract.training_patients:
            notes.append("this patient was in the model's training data: its fractions are optimistic")
        elif patient_id in ((contract.quantification or {}).get("validation_patients") or ()):
            notes.append(
                "this patient was one of the model's validation patients (threshold and calibration were "
                "fitted on it): its fractions are optimistic"
            )
        colour = self.mean_colour()
        if contract.colour_reference and colour:
            distance = colour_distance_sd(colour, contract.colour_reference)
            if distance > COLOUR_Z_LIMIT:
                notes.append(
                    f"colour outside the training patients' (mean RGB {', '.join(f'{c:.2f}' for c in colour)}; "
                    f"{distance:.1f} SD from theirs): stain or scanner differ, fractions may be wrong"
                )
        if contract.quantification and threshold != contract.threshold:
            notes.append(
                f"adjusted fraction not computed: threshold {threshold:g} is not the model's "
                f"{contract.threshold:g}, at which its error rates were measured"
            )
        return notes

    def summary_row(self, patient_id: str, threshold: float, model_sha256: str, contract: Contract) -> dict:
        """The patient's summary.csv row (the same row for the same counts and arguments, computed once)."""
        key = (patient_id, threshold, model_sha256, self.slide_note, *self.to_state().values())
        if self._summary is None or self._summary[0] != key or self._summary[1] is not contract:
            self._summary = (key, contract, self._summary_row(patient_id, threshold, model_sha256, contract))
        return dict(self._summary[2])

    def adopt_summary_row(
        self, row: dict, patient_id: str, threshold: float, model_sha256: str, contract: Contract
    ) -> None:
        """Take ``row`` as this tally's summary row (computed by summary_row from the same counts and arguments
        in a worker process, where the Monte Carlo intervals cost ~2 ms a patient off this process's time)."""
        key = (patient_id, threshold, model_sha256, self.slide_note, *self.to_state().values())
        self._summary = (key, contract, dict(row))

    def _summary_row(self, patient_id: str, threshold: float, model_sha256: str, contract: Contract) -> dict:
        low, high = wilson_interval(self.n_idc, self.n_scored)
        labelled = self.n_labelled > 0
        quant = contract.quantification or {}
        calibrated = contract.calibration is not None
        # the error rates hold at the model's threshold only; the class means need calibrated probabilities
        estimates = fraction_estimates(
            self.n_idc,
            self.n_scored,
            self.sum_prob,
            self.sum_prob_sq,
            quant.get("error_rates") if threshold == contract.threshold else None,
            quant.get("class_mean_probs") if calibrated else None,
        )
        return {
            "patient_id": patient_id,
            "n_patches": self.n_patches,
            "n_scored": self.n_scored,
            "n_failed": self.n_failed,
            "n_background": self.n_background,
            "n_blurred": self.n_blurred,
            "n_idc": self.n_idc,
            "idc_fraction": safe_ratio(self.n_idc, self.n_scored),
            "idc_fraction_ci95_low": low,
            "idc_fraction_ci95_high": high,
            "idc_fraction_adjusted": estimates["adjusted"],
            "idc_fraction_adjusted_ci95_low": estimates["adjusted_low"],
            "idc_fraction_adjusted_ci95_high": estimates["adjusted_high"],
            "idc_fraction_expected": estimates["expected"] if calibrated else None,
            "idc_fraction_expected_ci95_low": estimates["expected_low"],
            "idc_fraction_expected_ci95_high": estimates["expected_high"],
            "notes": "; ".join(self.notes(patient_id, contract, threshold)),
            "mean_prob_idc": safe_ratio(self.sum_prob, self.n_scored),
            "threshold": float(threshold),
            "n_labelled": self.n_labelled,
            "true_idc_fraction": safe_ratio(self.n_true_idc, self.n_labelled) if labelled else None,
            "sensitivity": self.confusion.sensitivity if labelled else None,
            "specificity": self.confusion.specificity if labelled else None,
            "balanced_accuracy": self.confusion.balanced_accuracy if labelled else None,
            "model_sha256": model_sha256,
            "notice": RESEARCH_NOTICE,
        }

    def to_state(self) -> dict:
        return {name: getattr(self, name) for name in STATE_FIELDS} | {
            "slide_note": self.slide_note,
            "skipped": self.skipped,
        }

    @classmethod
    def from_state(cls, state: dict) -> PatientTally:
        return cls(
            **{name: state[name] for name in STATE_FIELDS},
            slide_note=state.get("slide_note", ""),
            skipped=dict(state.get("skipped", {})),
        )


STATE_FIELDS = (
    "n_patches",
    "n_scored",
    "n_idc",
    "sum_prob",
    "sum_prob_sq",
    "sum_r",
    "sum_g",
    "sum_b",
    "n_labelled",
    "n_true_idc",
    "n_unreadable_dirs",
    "n_background",
    "n_blurred",
    "tp",
    "fp",
    "tn",
    "fn",
)


@dataclass
class ScoredPatch:
    path: Path
    decoded: Decoded
    prob_idc: float | None


class InlineExecutor(Executor):
    """An executor that runs each task in the calling thread as it is submitted: the engine in one thread (a
    worker process of processes.py), where handing batches between threads would only pass Python's lock."""

    _max_workers = 1

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - delivered by future.result(), as a pool's would be
            future.set_exception(exc)
        return future


def _chunks(items: Iterable[Path], size: int) -> Iterator[list[Path]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


# onnxruntime's memory grows with the batch (1.85 GB peak at 1024) while its CPU speed peaks at 16-32: larger
# --batch-size values are scored in runs of this many
MODEL_BATCH_MAX = 16
# patches one worker task decodes at once, whatever --batch-size: with 2 tasks in flight per worker, memory
# stays bounded (a 4096 batch held ~35 kB x 4096 per task)
TASK_BATCH_MAX = 256
MAX_CLOSING = 2  # patients whose reports the writer thread may hold at once


def _score_decoded(model, decoded: list[Decoded]) -> list[float | None]:
    """prob_idc for each decoded patch (None where it was not decodable); a non-finite model output turns the
    patch into a model_error row, never an "ok" one."""
    ok = [i for i, d in enumerate(decoded) if d.status == STATUS_OK]
    probs: list[float | None] = [None] * len(decoded)
    for start in range(0, len(ok), MODEL_BATCH_MAX):
        part = ok[start : start + MODEL_BATCH_MAX]
        values = model.predict_prob_idc(model_batch([decoded[i].ok_tensor() for i in part], model.contract)).tolist()
        for i, prob in zip(part, values):
            decoded[i].tensor = None  # let the model's input go as soon as it is scored
            if math.isfinite(prob):
                probs[i] = prob
            else:
                decoded[i] = Decoded(
                    STATUS_MODEL_ERROR,
                    f"the model gave a non-finite output ({prob})",
                    width_px=decoded[i].width_px,
                    height_px=decoded[i].height_px,
                    file_stat=decoded[i].file_stat,
                )
    return probs


def _decode_batch(decode: Callable[[Any], Decoded], chunk: list, contract, qc: QualityControl | None) -> list[Decoded]:
    decoded = [decode(item) for item in chunk]
    finish_batch(decoded, contract, qc)  # patches the decoder left pending (full-size ones), all at once
    return decoded


def _decode_and_score(model, decode: Callable[[Any], Decoded], chunk: list, qc: QualityControl | None):
    """One worker task's work on a batch: decode, finish, score (the same in score_batches and the pipeline)."""
    decoded = _decode_batch(decode, chunk, model.contract, qc)
    return decoded, _score_decoded(model, decoded)


def score_paths(
    model: LoadedModel,
    paths: Iterable,
    pool: Executor,
    batch_size: int = 64,
    lookahead: int | None = None,
    decode: Callable[[Any], Decoded] | None = None,
) -> Iterator[ScoredPatch]:
    """Yield every item (a patch path, or a slide's tile) with its decode outcome and prob_idc, in input order
    (score_batches, one patch at a time)."""
    for chunk, decoded, probs, _ in score_batches(model, paths, pool, batch_size, lookahead, decode):
        for path, result, prob in zip(chunk, decoded, probs):
            yield ScoredPatch(path, result, prob)


def score_batches(
    model: LoadedModel,
    paths: Iterable,
    pool: Executor,
    batch_size: int = 64,
    lookahead: int | None = None,
    decode: Callable[[Any], Decoded] | None = None,
    finish: Callable[[list, list, list], object] | None = None,
    qc: QualityControl | None = None,
) -> Iterator[tuple[list, list[Decoded], list[float | None], object]]:
    """Yield (items, decoded, prob_idc, finish(...)) for every batch of items, in input order.

    Each task of ``pool`` decodes a batch and runs the model on it in the same worker thread: with one
    onnxruntime thread per worker, every core decodes and scores without waiting for another (2 workers on
    2 cores: 1.3x the speed of decoding in one thread and running onnxruntime on two). ``lookahead`` batches
    (default: two per worker) are in flight; this thread only turns results into rows, in input order.
    A model whose runs must not overlap (Keras, in idc-eval) is run here instead (``thread_safe`` False).
    ``decode``: item -> Decoded (default: decode the path as a patch file, no quality control); ``finish``:
    (items, decoded, probs) -> anything, run in the worker too (the batch's CSV rows: off this thread).
    """
    contract = model.contract
    if decode is None:
        decode = lambda path: decode_file(path, contract)  # noqa: E731
    in_workers = getattr(model, "thread_safe", False)
    workers = max(1, getattr(pool, "_max_workers", 1))
    lookahead = lookahead or 2 * workers
    pending: deque[tuple[list, Future]] = deque()
    chunks = _chunks(paths, min(batch_size, TASK_BATCH_MAX))

    def task(chunk: list) -> tuple[list[Decoded], list[float | None] | None, object, float]:
        started = time.perf_counter()
        if not in_workers:
            return _decode_batch(decode, chunk, contract, qc), None, None, time.perf_counter() - started
        decoded, probs = _decode_and_score(model, decode, chunk, qc)
        extra = finish(chunk, decoded, probs) if finish is not None else None
        return decoded, probs, extra, time.perf_counter() - started

    for chunk in islice(chunks, lookahead):
        pending.append((chunk, pool.submit(task, chunk)))
    while pending:
        chunk, future = pending.popleft()
        following = next(chunks, None)
        if following is not None:
            pending.append((following, pool.submit(task, following)))
        waited = time.perf_counter()
        decoded, probs, extra, busy = future.result()
        if probs is None:
            probs = _score_decoded(model, decoded)
            extra = finish(chunk, decoded, probs) if finish is not None else None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch of %d: waited %.1f ms for it, its worker took %.1f ms",
                len(chunk),
                (time.perf_counter() - waited) * 1e3,
                busy * 1e3,
            )
            for path, result in zip(chunk, decoded):
                if result.status != STATUS_OK:
                    log.debug("%s: %s (%s)", path, result.status, result.message)
        yield chunk, decoded, probs, extra


def patch_row(scored: ScoredPatch, patient: Patient, threshold: float) -> PatchRow:
    """One CSV row for a patch. width_px, height_px: the patch's size in the frame of x, y (a patch file's own
    pixels; a slide tile's or QuPath region's level-0 pixels)."""
    display, x, y, label, extent = patient.describe(scored.path)
    pred = None if scored.prob_idc is None else int(scored.prob_idc >= threshold)
    width, height = extent if extent is not None else (scored.decoded.width_px, scored.decoded.height_px)
    return PatchRow(
        display, x, y, width, height, scored.prob_idc, pred, label, scored.decoded.status, scored.decoded.message
    )


class PatchSink(Protocol):
    """Something that consumes a patient's rows as they stream by (review outputs, for example)."""

    def add(self, row: PatchRow, rgb: np.ndarray | None) -> None:
        """One patch: its CSV row and its 8-bit RGB pixels (None when it could not be decoded)."""

    def close(self) -> None:
        """All rows seen: write the outputs (atomically)."""


class SinkFactory(Protocol):
    """(patient_id, out_dir, file stem, threshold, frame_scale=level-0 px per patch px of the rows) -> sink"""

    def __call__(
        self, patient_id: str, out_dir: Path, stem: str, threshold: float, *, frame_scale: float = ...
    ) -> PatchSink: ...


@dataclass
class RunSettings:
    out_dir: Path
    threshold: float
    batch_size: int = 64
    threads: int = 2
    resume: bool = False
    sink_factories: list[SinkFactory] = field(default_factory=list)
    qc: QualityControl | None = None  # quality control of each patch (None: every decodable patch is scored)
    # what else a patient's outputs depend on (review on/off, mosaic scale): --resume redoes a
    # patient finished with other values
    output_settings: dict = field(default_factory=dict)


def _state_path(out_dir: Path, stem: str) -> Path:
    return out_dir / STATE_DIR / f"{stem}.json"


class InputFingerprint:
    """sha256 over a patient's file list as scored: each path with its size and modification time.

    --resume keeps a patient only if this is unchanged: patches added, removed or rewritten since
    (a class folder deleted, 212 files added) mean the patient's reports are stale."""

    def __init__(self, key: str = ""):
        self._digest = hashlib.sha256()
        if key:  # what the items do not say (a slide's file and tiling settings)
            self._digest.update(key.encode("utf-8", "surrogateescape") + b"\n")

    @staticmethod
    def line(item, file_stat: tuple[int, int] | None = None) -> bytes:
        """What one item adds; ``file_stat``: (size, mtime_ns) as the decoder saw the file (else stat'ed here)."""
        if not isinstance(item, Path):  # a slide's tile: its place and size (the slide file is in the key)
            return f"{item.fingerprint}\n".encode()
        size, mtime = file_stat if file_stat is not None else file_stat_of(item)
        return f"{item}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape")

    def add(self, item, file_stat: tuple[int, int] | None = None) -> None:
        self._digest.update(self.line(item, file_stat))

    def update(self, lines: bytes) -> None:
        self._digest.update(lines)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def input_fingerprint(patient: Patient) -> str:
    fingerprint = InputFingerprint(patient.input_key())
    try:
        for item in patient.iter_paths(SkipCounter()):
            fingerprint.add(item)
    finally:
        patient.finish()
    return fingerprint.hexdigest()


def _completed_tally(settings: RunSettings, stem: str, patient: Patient, model: LoadedModel) -> PatientTally | None:
    """The tally of a patient finished by an earlier run of this idc version with the same model, threshold,
    outputs and input files."""
    patient_id = patient.patient_id
    state_file = _state_path(settings.out_dir, stem)
    csv_file = settings.out_dir / f"{stem}.csv"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        tally = PatientTally.from_state(state["tally"])
        checks = {
            "patient": state.get("patient_id") == patient_id,
            "model": state.get("model_sha256") == model.sha256,
            "threshold": state.get("threshold") == settings.threshold,
            "output settings": state.get("output_settings", {}) == settings.output_settings,
            "CSV unchanged": state.get("csv_sha256") == sha256_of(csv_file),
            "idc version": state.get("idc_version") == __version__,
            "CSV columns": state.get("csv_columns") == list(PATCH_COLUMNS),  # a CSV of another layout is stale
        }
        if all(checks.values()):  # only then walk the patient's files again
            checks["input files unchanged"] = state.get("inputs_sha256") == input_fingerprint(patient)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.info("patient %s: no usable record of an earlier run (%s); scoring it", patient_id, exc)
        return None
    differs = [name for name, same in checks.items() if not same]
    if differs:
        log.info("patient %s: earlier run differs (%s); scoring it again", patient_id, ", ".join(differs))
        return None
    log.info("patient %s: already done with this model and settings; kept", patient_id)
    return tally


class PatientOutputs:
    """One patient's reports while its batches arrive: its CSV (a temp file until closed), review sinks, tally
    and input fingerprint. ``rows_of`` runs in the workers; ``add``, ``close`` and ``abort`` in the writing thread."""

    def __init__(self, model: LoadedModel, patient: Patient, settings: RunSettings):
        self.model, self.patient, self.settings = model, patient, settings
        self.stem = safe_file_stem(patient.patient_id)
        self.csv_file = settings.out_dir / f"{self.stem}.csv"
        if settings.resume:  # outputs of an earlier run for this patient are stale: a sink may not rewrite them
            for suffix in PATIENT_SUFFIXES:
                (settings.out_dir / f"{self.stem}{suffix}").unlink(missing_ok=True)
        self.tally = PatientTally()
        self.skipped = SkipCounter()  # this patient's own: the next patient's files are listed while it is scored
        self.fingerprint = InputFingerprint(patient.input_key())
        self.decode = patient.decoder(model.contract, settings.qc)
        self.sinks: list[PatchSink] | None = None
        self.started = time.perf_counter()
        self._csv = contextlib.ExitStack()
        self.handle = self._csv.enter_context(atomic_path(self.csv_file, newline=""))
        CsvOut(self.handle, PATCH_COLUMNS)  # the header

    def items(self) -> Iterator:
        return self.patient.iter_paths(self.skipped)

    def rows_of(self, chunk: list, decoded: list[Decoded], probs: list) -> tuple[list[PatchRow], str, bytes]:
        """In the worker: the batch's rows, their CSV text and fingerprint lines (kept off the writing thread)."""
        threshold = self.settings.threshold
        rows = [patch_row(ScoredPatch(*scored), self.patient, threshold) for scored in zip(chunk, decoded, probs)]
        text = io.StringIO()
        CsvOut(text, PATCH_COLUMNS, write_header=False).rows(rows)
        lines = b"".join(InputFingerprint.line(item, d.file_stat) for item, d in zip(chunk, decoded))
        return rows, text.getvalue(), lines

    def _make_sinks(self) -> list[PatchSink]:
        if self.sinks is None:  # at the first batch: a slide knows its scale by then
            settings = self.settings
            self.sinks = [
                make(
                    self.patient.patient_id,
                    settings.out_dir,
                    self.stem,
                    settings.threshold,
                    frame_scale=self.patient.frame_scale,
                )
                for make in settings.sink_factories
            ]
        return self.sinks

    def add(self, decoded: list[Decoded], probs: list, extra: tuple[list[PatchRow], str, bytes]) -> None:
        rows, text, lines = extra
        sinks = self._make_sinks()
        self.handle.write(text)
        self.fingerprint.update(lines)
        for row, result, prob in zip(rows, decoded, probs):
            for sink in sinks:
                sink.add(row, result.rgb)
            self.tally.add(prob, row.pred, row.label, result.colour, result.status)
            result.rgb = None

    def close(self, skipped: SkipCounter) -> PatientTally:
        """Commit the CSV, write the review outputs, then the resume state (last: it vouches for the rest)."""
        patient, settings, tally = self.patient, self.settings, self.tally
        patient.finish()
        self._csv.close()  # the CSV replaces any earlier one, atomically
        sinks = self._make_sinks()  # no item at all: the sinks still remove what an earlier run left
        stats = getattr(patient, "stats", None)
        tally.slide_note = stats.note() if stats is not None else ""
        tally.n_unreadable_dirs = self.skipped.counts[UNREADABLE_DIRECTORY]
        tally.skipped = dict(self.skipped.counts)
        skipped.counts.update(self.skipped.counts)
        for sink in sinks:
            sink.close()
        state = {
            "patient_id": patient.patient_id,
            "model_sha256": self.model.sha256,
            "threshold": settings.threshold,
            "csv_sha256": sha256_of(self.csv_file),
            "output_settings": settings.output_settings,
            "inputs_sha256": self.fingerprint.hexdigest(),
            "idc_version": __version__,
            "csv_columns": list(PATCH_COLUMNS),
            "tally": tally.to_state(),
        }
        with atomic_path(_state_path(settings.out_dir, self.stem)) as handle:
            handle.write(json.dumps(state, sort_keys=True))  # dumps: json's C encoder (dump streams in Python)
        # summary.csv's row, here in the writer thread while the workers score the next patients
        tally.summary_row(patient.patient_id, settings.threshold, self.model.sha256, self.model.contract)
        log.info(
            "patient %s: %d patches, %d failed, in %.1f s",
            patient.patient_id,
            tally.n_patches,
            tally.n_failed,
            time.perf_counter() - self.started,
        )
        if tally.n_patches == 0:
            log.warning(
                "patient %s: no image files found under %s", patient.patient_id, patient.root or "the listed paths"
            )
        return tally

    def abort(self, exc: BaseException | None = None) -> None:
        """Interrupted: no CSV and no review file for this patient (an earlier run's stay only without --resume)."""
        for sink in self.sinks or ():
            getattr(sink, "abort", lambda: None)()
        self.patient.finish()
        error = exc if exc is not None else KeyboardInterrupt()
        self._csv.__exit__(type(error), error, error.__traceback__)  # the temp CSV is removed


def _stream_patients(
    model: LoadedModel,
    entries: Iterator[tuple],
    pool: Executor,
    settings: RunSettings,
    skipped: SkipCounter,
    on_batch: Callable[[int], None],
    on_done: Callable[[int, PatientTally, bool], None],
) -> None:
    """Score the patients of ``entries`` — ("kept", index, tally) or ("score", index, PatientOutputs) — in one
    pipeline: the workers go on with the next patient's batches while this thread closes the last one's files
    (a patient of 40 patches no longer leaves the cores idle while its reports are written)."""
    workers = max(1, getattr(pool, "_max_workers", 1))
    lookahead = 2 * workers
    # ("kept", index, tally) | ("batch", outputs, chunk, future) | ("end", index, outputs)
    pending: deque[tuple] = deque()
    in_flight = 0
    open_outputs: list[PatientOutputs] = []

    def task(outputs: PatientOutputs, chunk: list):
        decoded, probs = _decode_and_score(model, outputs.decode, chunk, settings.qc)
        return decoded, probs, outputs.rows_of(chunk, decoded, probs)

    def batches() -> Iterator[tuple]:
        for kind, index, payload in entries:
            if kind == "kept":
                yield ("kept", index, payload)
                continue
            open_outputs.append(payload)
            for chunk in _chunks(payload.items(), min(settings.batch_size, TASK_BATCH_MAX)):
                yield ("batch", payload, chunk)
            yield ("end", index, payload)

    feed = batches()
    # a patient's files are closed (mosaic rendered and encoded, GeoJSON copied, state written) by a writer
    # thread while this one takes the next patient's batches; results are reported in input order
    closing: deque[tuple[int, Future, bool]] = deque()
    writer: Executor = (
        InlineExecutor()
        if isinstance(pool, InlineExecutor)
        else ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
    )

    def report(block: bool) -> None:
        while closing and (block or closing[0][1].done()):
            index, future, kept = closing.popleft()
            on_done(index, future.result(), kept)

    def finished(value) -> Future:
        future: Future = Future()
        future.set_result(value)
        return future

    try:
        while True:
            while in_flight < lookahead and len(pending) < lookahead + 256:
                entry = next(feed, None)
                if entry is None:
                    break
                if entry[0] == "batch":
                    _, outputs, chunk = entry
                    pending.append(("batch", outputs, chunk, pool.submit(task, outputs, chunk)))
                    in_flight += 1
                else:
                    pending.append(entry)
            if not pending:
                report(block=True)
                return
            report(block=False)
            entry = pending.popleft()
            if entry[0] == "batch":
                _, outputs, chunk, future = entry
                in_flight -= 1
                decoded, probs, extra = future.result()
                outputs.add(decoded, probs, extra)
                on_batch(len(chunk))
            elif entry[0] == "end":
                _, index, outputs = entry
                open_outputs.remove(outputs)
                closing.append((index, writer.submit(outputs.close, skipped), False))
                while sum(not kept for _, _, kept in closing) > MAX_CLOSING:  # a slow disk must not pile up canvases
                    closing[0][1].result()
                    report(block=False)
            else:
                _, index, tally = entry
                skipped.counts.update(tally.skipped)  # a kept patient's skipped files are still in run.json
                on_batch(tally.n_patches)
                closing.append((index, finished(tally), True))
    except BaseException as exc:
        for entry in pending:
            if entry[0] == "batch":
                entry[3].cancel()
        for outputs in open_outputs:
            outputs.abort(exc)
        raise
    finally:
        writer.shutdown(wait=True)  # patients being closed are finished: their reports are whole


def score_patient(
    model: LoadedModel,
    patient: Patient,
    settings: RunSettings,
    pool: Executor,
    skipped: SkipCounter,
    on_patch: Callable[[int], None] = lambda n: None,
) -> PatientTally:
    """Score one patient and write its CSV atomically; returns its tally."""
    done: list[PatientTally] = []
    _stream_patients(
        model,
        iter([("score", 0, PatientOutputs(model, patient, settings))]),
        pool,
        settings,
        skipped,
        on_patch,
        lambda index, tally, kept: done.append(tally),
    )
    return done[0]


@dataclass
class RunResult:
    summary_rows: list[dict]
    cohort: PatientTally
    skipped: SkipCounter
    resumed: list[str]
    elapsed_s: float


def worker_threads(threads: int) -> int:
    """Threads that decode and score (each runs onnxruntime on one core): one per --threads."""
    return max(1, threads)


def existing_reports(out_dir: Path) -> bool:
    return (out_dir / "summary.csv").exists() or (out_dir / STATE_DIR).exists()


RUN_FILES = ("summary.csv", "run.json", "report.html")
PATIENT_SUFFIXES = (".csv", ".geojson", "_mosaic.png")


def clear_previous_run(out_dir: Path) -> None:
    """--overwrite: remove what an earlier run wrote (and only that), so no stale report or
    mosaic sits beside the new ones."""
    state_dir = out_dir / STATE_DIR
    if state_dir.is_dir():
        for state_file in state_dir.glob("*.json"):
            for suffix in PATIENT_SUFFIXES:
                (out_dir / f"{state_file.stem}{suffix}").unlink(missing_ok=True)
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(state_dir, ignore_errors=True)


def run_patients(
    model: LoadedModel,
    patients: list[Patient],
    settings: RunSettings,
    progress: Callable[[int], None] = lambda n: None,
    on_patient_done: Callable[[str], None] = lambda pid: None,
) -> RunResult:
    """Score every patient (skipping completed ones on resume) and write summary.csv."""
    start = time.perf_counter()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    skipped = SkipCounter()
    tallies: list[PatientTally] = []
    resumed: list[str] = []
    by_index: dict[int, PatientTally] = {}

    def entries() -> Iterator[tuple]:
        for index, patient in enumerate(patients):
            stem = safe_file_stem(patient.patient_id)
            tally = _completed_tally(settings, stem, patient, model) if settings.resume else None
            yield (
                ("kept", index, tally)
                if tally is not None
                else ("score", index, PatientOutputs(model, patient, settings))
            )

    def done(index: int, tally: PatientTally, kept: bool) -> None:
        by_index[index] = tally
        if kept:
            resumed.append(patients[index].patient_id)
        on_patient_done(patients[index].patient_id)

    with ThreadPoolExecutor(max_workers=worker_threads(settings.threads), thread_name_prefix="score") as pool:
        _stream_patients(model, entries(), pool, settings, skipped, progress, done)
    tallies = [by_index[i] for i in range(len(patients))]
    rows, cohort = write_summary(model, patients, tallies, settings)
    return RunResult(rows, cohort, skipped, resumed, time.perf_counter() - start)


def write_summary(
    model: LoadedModel, patients: list[Patient], tallies: list[PatientTally], settings: RunSettings
) -> tuple[list[dict], PatientTally]:
    """summary.csv: one row per patient in input order, then the cohort's (merged in that order, so its sums
    are the same bytes however the patients were scored)."""
    rows = [
        tally.summary_row(patient.patient_id, settings.threshold, model.sha256, model.contract)
        for patient, tally in zip(patients, tallies)
    ]
    cohort = PatientTally()
    for tally in tallies:
        cohort.merge(tally)
    if len(patients) > 1:
        rows.append(cohort.summary_row(COHORT_ID, settings.threshold, model.sha256, model.contract))
    write_csv(settings.out_dir / "summary.csv", SUMMARY_COLUMNS, rows)
    return rows, cohort
