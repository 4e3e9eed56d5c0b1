"""Keras -> ONNX with tf2onnx, the contract written into the file, and the fp32 parity gate."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idc_infer import __version__, code_version
from idc_infer.contract import CONTRACT_KEY, Contract
from idc_infer.errors import IdcError
from idc_infer.model import sha256_of

from .graph import optimize_for_cpu

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
OPSET_RANGE = (13, 18)  # tested 13 and 17; tf2onnx 1.17 converts up to opset 18
PARITY_TOLERANCE = 1e-4


class ParityError(IdcError, RuntimeError):
    """onnxruntime and Keras disagree on the same inputs beyond tolerance."""


class ConversionError(IdcError, RuntimeError):
    """tf2onnx could not convert the model."""


@dataclass
class ParityReport:
    n_inputs: int
    max_abs_diff: float
    label_flips: int

    def as_dict(self) -> dict:
        return {
            "n_inputs": self.n_inputs,
            "max_abs_diff": self.max_abs_diff,
            "label_flips": self.label_flips,
            "tolerance": PARITY_TOLERANCE,
        }


def keras_to_onnx(model, contract: Contract, opset: int = DEFAULT_OPSET):
    """Convert through a tf.function with an explicit signature (from_keras fails on Keras 3)."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec([None, contract.input_height_px, contract.input_width_px, 3], tf.float32, name="input")]

    @tf.function(input_signature=spec)
    def serve(images):
        return {"prob": model(images, training=False)}

    try:
        onnx_model, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    except Exception as exc:  # tf2onnx raises ValueError, AssertionError, its own errors...
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"tf2onnx could not convert the model at opset {opset}: {first_line[:300]}") from exc
    return onnx_model


def export_settings(opset: int, precision: str = "fp32") -> dict:
    """How the file was made: converter and library versions (recorded in the contract)."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    return {
        "tool": "tf2onnx",
        "tf2onnx": tf2onnx.__version__,
        "opset": opset,
        "precision": precision,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onnx": onnx.__version__,
    }


def set_contract(onnx_model, contract: Contract) -> None:
    """Write (or replace) the contract in the model's metadata_props."""
    for prop in list(onnx_model.metadata_props):
        if prop.key == CONTRACT_KEY:
            onnx_model.metadata_props.remove(prop)
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = CONTRACT_KEY, contract.to_json()
    onnx_model.producer_name = "idc-export"
    onnx_model.producer_version = __version__


def load_parity_inputs(contract: Contract, sample_dirs: list[Path], n_random: int = 64, seed: int = 0) -> np.ndarray:
    """Real patches (through the infer-side decoder, as the lab PC will see them) plus noise."""
    from idc_infer.naming import is_candidate_image
    from idc_infer.preprocess import decode_file
    from idc_infer.schema import STATUS_OK

    tensors = []
    for directory in sample_dirs:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file() and is_candidate_image(path.name):
                decoded = decode_file(path, contract)
                if decoded.status == STATUS_OK:
                    tensors.append(decoded.ok_tensor())
            if len(tensors) >= 512:
                break
    rng = np.random.default_rng(seed)
    lo, hi = contract.offset, contract.offset + 255 * contract.scale
    noise = rng.uniform(lo, hi, size=(n_random, contract.input_height_px, contract.input_width_px, 3)).astype(
        np.float32
    )
    return np.concatenate([np.stack(tensors), noise]) if tensors else noise


def check_parity(
    keras_model, onnx_bytes: bytes, inputs: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> ParityReport:
    """Compare Keras and onnxruntime outputs on the same inputs; ParityError beyond tolerance."""
    from idc_infer.model import cpu_session

    session = cpu_session(onnx_bytes)
    name = session.get_inputs()[0].name
    ort_probs = np.concatenate([session.run(None, {name: inputs[i : i + 256]})[0] for i in range(0, len(inputs), 256)])
    keras_probs = keras_model.predict(inputs, batch_size=256, verbose=0)
    diff = float(np.max(np.abs(ort_probs - keras_probs)))
    flips = int(np.sum(np.argmax(ort_probs, 1) != np.argmax(keras_probs, 1)))
    report = ParityReport(len(inputs), diff, flips)
    if not diff <= tolerance:
        raise ParityError(
            f"onnxruntime and Keras differ by up to {diff:.3g} (> {tolerance:g}) on {len(inputs)} "
            f"inputs, {flips} label flip(s): the export is not faithful"
        )
    return report


def read_meta(keras_path: Path) -> dict | None:
    """The training run's train_meta.json beside the model, or None."""
    meta_file = Path(keras_path).parent / "train_meta.json"
    return json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else None


def held_out_dirs(meta: dict | None) -> list[Path]:
    """Validation and test patient directories of the split: real patches the parity gate should see."""
    if not meta or not meta.get("data_dir"):
        return []
    root = Path(meta["data_dir"])
    return [
        root / pid for name in ("val", "test") for pid in meta.get("split", {}).get(name, []) if (root / pid).is_dir()
    ]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def contract_for(keras_path: Path, meta: dict | None, opset: int) -> Contract:
    """The contract of an exported model, with provenance from the training run's train_meta.json."""
    meta = meta or {}
    provenance = {
        "demo": bool(meta.get("demo", True)),
        "training_data": meta.get("training_data", "unknown (no train_meta.json next to the model)"),
        "split": meta.get("split_method", "unknown"),
        "split_patients": meta.get("split", {}),
        "metrics": meta.get("metrics", {}).get("test") or meta.get("metrics", {}).get("val") or {},
        "metrics_on": "test patients" if meta.get("metrics", {}).get("test") else "validation patients",
        "all_metrics": meta.get("metrics", {}),
        # uniform-sample pooled metrics with patient-bootstrap intervals, whole-patient fraction error
        "val_evaluation": meta.get("val_evaluation"),
        "threshold_chosen_on": meta.get("threshold_chosen_on", "default 0.5"),
        "trained_at": meta.get("trained_at"),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "source_model_sha256": sha256_of(Path(keras_path)),
        "export": export_settings(opset),
        "arch": meta.get("arch", "cancernet"),
    }
    trained = meta.get("contract")
    if trained is None:  # a run of idc 0.1 (or no train_meta.json): the defaults it trained with
        log.warning("train_meta.json records no contract (an older run): the default preprocessing is assumed")
        return Contract(
            threshold=float(meta.get("threshold", 0.5)), provenance=provenance, patch_mpp=meta.get("patch_mpp")
        )
    return Contract.from_record(trained | {"provenance": provenance})


def export_fp32(keras_path: Path, out_path: Path, sample_dirs: list[Path], opset: int = DEFAULT_OPSET) -> dict:
    """Export one Keras model to an fp32 ONNX file with its contract, after the parity gate."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import keras

    from idc_infer.files import atomic_path

    keras_path = Path(keras_path)
    meta = read_meta(keras_path)
    if meta is None:
        log.warning(
            "no train_meta.json beside %s: the contract will say the training data is unknown (demo)", keras_path
        )
    model = keras.models.load_model(keras_path, compile=False)
    contract = contract_for(keras_path, meta, opset)
    onnx_model = keras_to_onnx(model, contract, opset)
    # faster on onnxruntime's CPU provider, the same outputs; the parity gate below checks the rewritten graph
    contract.provenance["export"]["graph_rewrites"] = optimize_for_cpu(onnx_model)
    set_contract(onnx_model, contract)
    data = onnx_model.SerializeToString()
    # without --parity-data, the held-out patients of the run's split: real patches, not noise alone
    parity = check_parity(model, data, load_parity_inputs(contract, list(sample_dirs) or held_out_dirs(meta)))
    contract.provenance["export"]["parity"] = parity.as_dict()  # metadata only: the graph checked is unchanged
    set_contract(onnx_model, contract)
    data = onnx_model.SerializeToString()
    with atomic_path(Path(out_path), mode="wb") as handle:
        handle.write(data)
    return {
        "path": str(out_path),
        "sha256": sha256_bytes(data),
        "size_bytes": len(data),
        "parity": parity.as_dict(),
        "contract": json.loads(contract.to_json()),
    }
