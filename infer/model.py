"""Load an ONNX model with its contract and score batches of patches with onnxruntime."""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .contract import Contract, ContractError, contract_from_metadata
from .errors import IdcError
from .quantify import apply_calibration  # at import: a from-import in predict_prob_idc took the import lock per batch

FP32_NAME, INT8_NAME = "cancernet-fp32.onnx", "cancernet-int8.onnx"


class InferenceSession(Protocol):
    """What idc uses of an onnxruntime.InferenceSession (a test or another runtime may stand in)."""

    def run(self, output_names: list[str] | None, input_feed: dict[str, Any]) -> list[Any]: ...


class ModelError(IdcError, ValueError):
    """The model file cannot be used; the message names the file and why."""


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str] | None]:
    """CPU model name and feature flags from /proc/cpuinfo (Linux); None where unknown."""
    model_name, flags = None, None
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model_name is None:
                    model_name = value.strip() or None
                elif key == "flags" and flags is None:
                    flags = set(value.split())
                if model_name is not None and flags is not None:
                    break
    except OSError:
        pass
    return model_name, flags


def shipped_model_path(precision: str = "fp32") -> Path | None:
    """The shipped model file of ``precision`` ("fp32" or "int8") in the ``idc_models`` package; None if absent."""
    candidate = importlib.resources.files("idc_models") / (INT8_NAME if precision == "int8" else FP32_NAME)
    return Path(str(candidate)) if candidate.is_file() else None


def default_model_path() -> Path:
    """The shipped fp32 model (``idc-infer --precision auto`` may pick the int8 one by timing both)."""
    path = shipped_model_path("fp32")
    if path is None:
        raise ModelError("no default model is installed in idc_models; pass --model FILE")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    path: Path
    sha256: str
    contract: Contract
    session: InferenceSession  # onnxruntime.InferenceSession
    input_name: str
    thread_safe = True  # onnxruntime sessions take concurrent run() calls: engine workers score in parallel

    def raw_prob_idc(self, batch: np.ndarray) -> np.ndarray:
        """The graph's own probability of the positive class for a float32 NHWC batch (uncalibrated)."""
        probs = self.session.run(None, {self.input_name: batch})[0]
        return np.asarray(probs[:, self.contract.positive_class_index], dtype=np.float64)

    def predict_prob_idc(self, batch: np.ndarray) -> np.ndarray:
        """Probability of the positive class, calibrated as the contract says (NaN where the graph
        gave a non-finite output: the engine reports those patches as model_error)."""
        raw = self.raw_prob_idc(batch)
        if self.contract.calibration is None:
            return raw
        out = apply_calibration(raw, self.contract.calibration)
        out[~np.isfinite(raw)] = np.nan
        return out


def cpu_session(source: Path | str | bytes, threads: int = 0, spin: bool | None = None):
    """The one way idc opens an onnxruntime session (inference, export gates, calibration, benchmarks): the CPU
    provider, ``threads`` intra-op threads (0: onnxruntime's default, one per core), one inter-op thread,
    warnings off; ``spin`` sets whether idle threads spin (None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if spin is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    source = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def session_prob_idc(session, tensors: np.ndarray, positive_index: int = 1, batch_size: int = 256) -> np.ndarray:
    """Positive-class probabilities of a raw session (no calibration: what the graph itself outputs), float64."""
    if len(tensors) == 0:
        return np.zeros(0)
    name = session.get_inputs()[0].name
    out = [
        session.run(None, {name: tensors[i : i + batch_size]})[0][:, positive_index]
        for i in range(0, len(tensors), batch_size)
    ]
    return np.concatenate(out).astype(np.float64)


def load_model(path: Path, threads: int = 0, spin: bool | None = None) -> LoadedModel:
    """Open a model file for inference; ModelError (with the file name) for any unusable file."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a model file")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        session = cpu_session(path, threads, spin)
    except Exception as exc:  # onnxruntime raises its own exception types for every bad file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} is not a loadable ONNX model: {first_line[:200]}") from exc
    try:
        contract = contract_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
    except ContractError as exc:
        raise ModelError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} inputs; idc models take exactly one")
    _check_graph_matches_contract(path, contract, inputs[0].shape, session.get_outputs()[0].shape)
    model = LoadedModel(path, sha256_of(path), contract, session, inputs[0].name)
    _check_outputs_are_probabilities(model)
    return model


def _check_outputs_are_probabilities(model: LoadedModel) -> None:
    """A probe batch (mid-grey, black, white, seeded noise) must give finite class probabilities in [0, 1]
    that sum to 1: a graph that outputs logits, or NaN, would give reports that look fine and mean nothing."""
    contract = model.contract
    shape = (contract.input_height_px, contract.input_width_px, 3)
    pixels = np.stack(
        [np.full(shape, 128), np.zeros(shape), np.full(shape, 255), np.random.default_rng(0).integers(0, 256, shape)]
    ).astype(np.float32)
    batch = pixels * np.float32(contract.scale) + np.float32(contract.offset)
    try:
        out = np.asarray(model.session.run(None, {model.input_name: batch})[0], dtype=np.float64)
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelError(f"{model.path} fails on a probe batch: {str(exc).strip().splitlines()[0][:200]}") from exc
    if out.ndim != 2 or out.shape[0] != len(batch):
        raise ModelError(
            f"{model.path} outputs shape {list(out.shape)} for a batch of {len(batch)}; "
            "idc models output one row of class probabilities per patch"
        )
    if not np.all(np.isfinite(out)):
        raise ModelError(f"{model.path} outputs non-finite values (NaN or inf) on a probe batch: the model is broken")
    if out.min() < -1e-6 or out.max() > 1 + 1e-6 or np.max(np.abs(out.sum(axis=1) - 1.0)) > 1e-3:
        raise ModelError(
            f"{model.path} does not output class probabilities (values {out.min():.3g}..{out.max():.3g}, "
            f"row sums up to {np.max(np.abs(out.sum(axis=1) - 1.0)) + 1:.3g}): a graph ending in "
            "logits needs its softmax; idc refuses to guess"
        )


def _check_graph_matches_contract(path: Path, contract: Contract, input_shape: list, output_shape: list) -> None:
    """The contract says how patches are fed; a graph that wants something else is a broken model file."""
    expected = [contract.input_height_px, contract.input_width_px, 3]  # the contract allows NHWC only
    fixed = [(dim, want) for dim, want in zip(list(input_shape)[1:], expected) if isinstance(dim, int)]
    if len(input_shape) != 4 or any(dim != want for dim, want in fixed):
        raise ModelError(
            f"{path}: its contract says {contract.layout} input {contract.input_height_px}x"
            f"{contract.input_width_px}x3 but the graph takes {list(input_shape)}; the file is inconsistent"
        )
    n_classes = output_shape[-1] if output_shape else None
    if isinstance(n_classes, int) and n_classes != len(contract.class_names):
        raise ModelError(
            f"{path}: its contract names {len(contract.class_names)} classes but the graph outputs "
            f"{n_classes}; the file is inconsistent"
        )
