"""The preprocessing contract: what a model file promises about its input and output.

The contract travels inside the ONNX file (``metadata_props`` key ``idc.contract``) so the
lab PC needs nothing but the file. This module reads it with onnxruntime alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import IdcError

CONTRACT_KEY = "idc.contract"
SCHEMA_VERSION = 3
# 2 added calibration, quantification, training_patients, colour_reference; 3 added patch_mpp
READABLE_SCHEMA_VERSIONS = (1, 2, 3)

# The physical scale of the public "Breast Histopathology Images" patches (the set idc-train trains on by
# default). Cruz-Roa et al. 2014 (Proc. SPIE 9041, 904103) scanned the 162 slides at 40x (about 0.25 um per
# pixel) and downsampled them 16:1, to an apparent 2.5x of about 4 um per pixel; Janowczyk & Madabhushi 2016
# (J Pathol Inform 7:29, use case 6) cut this set's 50x50 patches from those images (so a patch spans about
# 200 um, and the x, y of its file name are pixels of the 2.5x image, in 50 px steps). The scanner's exact
# pixel size is not stated, so the scale is good to about +-10%: tiles cut at 4.0 um/px from a slide are at
# the training patches' scale within that.
PUBLIC_SET_PATCH_MPP = 4.0

RESIZE_METHODS = ("nearest",)
UNDERSIZED_POLICIES = ("resize", "pad", "refuse")
OVERSIZED_POLICIES = ("resize", "refuse")


class ContractError(IdcError, ValueError):
    """The model file has no usable contract."""


DEMO_WARNING = "DEMO MODEL: trained on synthetic data. Its outputs say nothing about real tissue."
UNVERIFIED_WARNING = "UNVERIFIED MODEL: its contract says nothing of its training data or how it was evaluated."


@dataclass(frozen=True)
class Contract:
    """Everything needed to turn a patch file into the model's input tensor and back."""

    input_height_px: int = 48
    input_width_px: int = 48
    layout: str = "NHWC"
    channel_order: str = "RGB"
    # pixel value fed to the model = raw_uint8 * scale + offset
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    resize_method: str = "nearest"
    native_patch_px: int = 50
    undersized_policy: str = "resize"
    oversized_policy: str = "refuse"
    class_names: tuple[str, ...] = ("non-IDC", "IDC")
    positive_class_index: int = 1
    threshold: float = 0.5
    provenance: dict[str, Any] = field(default_factory=dict)
    # prob_idc = sigmoid(a * logit(raw) + b) when set ({"method": "platt", "a", "b", ...}); the threshold
    # applies to the calibrated probability
    calibration: dict[str, Any] | None = None
    # the model's error at its threshold on validation patients, for the corrected fractions
    # (idc_infer.quantify): {"error_rates": {...}, "class_mean_probs": [...], "headline": ...}
    quantification: dict[str, Any] | None = None
    training_patients: tuple[str, ...] = ()
    # per-patient mean colour of the training patients: {"mean_rgb": [..], "std_rgb": [..], "n_patients"}
    colour_reference: dict[str, Any] | None = None
    # microns per pixel of a native patch (native_patch_px * patch_mpp um a side): the scale at which slides
    # are cut into tiles for this model. None: unknown (a model exported before schema 3); slides then need
    # idc-infer --patch-mpp
    patch_mpp: float | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.schema_version not in READABLE_SCHEMA_VERSIONS:
            problems.append(
                f"schema_version {self.schema_version} (this idc reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))})"
            )
        if self.calibration is not None and (
            self.calibration.get("method") != "platt"
            or not all(
                isinstance(self.calibration.get(k), (int, float)) and math.isfinite(self.calibration[k])
                for k in ("a", "b")
            )
            or self.calibration["a"] <= 0
        ):
            problems.append(f"calibration {self.calibration!r} (only platt with finite a > 0, b)")
        if self.layout != "NHWC":
            problems.append(f"layout {self.layout!r} (only NHWC)")
        if self.channel_order not in ("RGB", "BGR"):
            problems.append(f"channel_order {self.channel_order!r}")
        if self.resize_method not in RESIZE_METHODS:
            problems.append(f"resize_method {self.resize_method!r}")
        if self.undersized_policy not in UNDERSIZED_POLICIES:
            problems.append(f"undersized_policy {self.undersized_policy!r}")
        if self.oversized_policy not in OVERSIZED_POLICIES:
            problems.append(f"oversized_policy {self.oversized_policy!r}")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold {self.threshold} outside [0, 1]")
        if not 0 <= self.positive_class_index < len(self.class_names):
            problems.append(f"positive_class_index {self.positive_class_index}")
        if self.patch_mpp is not None and not (
            isinstance(self.patch_mpp, (int, float)) and math.isfinite(self.patch_mpp) and self.patch_mpp > 0
        ):
            problems.append(f"patch_mpp {self.patch_mpp!r} (microns per pixel: a positive number)")
        if min(self.input_height_px, self.input_width_px, self.native_patch_px) < 1:
            problems.append("non-positive size")
        if problems:
            raise ContractError("invalid contract: " + "; ".join(problems))

    @property
    def is_demo(self) -> bool:
        return bool(self.provenance.get("demo", True))

    @property
    def demo_warning(self) -> str | None:
        """What a reader must be told first about a model not trained and evaluated on real data (None: it was):
        a synthetic demo, or a contract that says nothing of its training at all."""
        if not self.is_demo:
            return None
        if self.provenance.get("demo") is True and "synthetic" in str(self.provenance.get("training_data", "")).lower():
            return DEMO_WARNING
        # no provenance, no demo flag, or an export without its training record: nothing is known, not "synthetic"
        return UNVERIFIED_WARNING

    @property
    def failed_gate(self) -> bool:
        """An int8 file written although it failed its accuracy gate at export."""
        return self.provenance.get("quantization_gate") == "failed"

    def describe_training(self) -> str:
        """One line saying what the model was trained on, for stderr and run.json."""
        data = self.provenance.get("training_data", "unknown training data")
        metrics = self.provenance.get("metrics", {})
        bits = [data]
        if metrics.get("roc_auc") is not None:
            bacc = metrics.get("balanced_accuracy")
            bits.append(
                f"ROC-AUC {metrics['roc_auc']:.3f}, balanced accuracy "
                f"{'n/a' if bacc is None else format(bacc, '.3f')} on "
                f"{self.provenance.get('metrics_on') or 'held-out patients'}"
            )
        return "; ".join(bits)

    def to_json(self) -> str:
        from .files import finite_json  # NaN metrics (one class absent) are null: the contract stays strict JSON

        return json.dumps(finite_json(dataclasses.asdict(self)), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Contract:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"contract is not valid JSON: {exc}") from exc
        return cls.from_record(raw)

    @classmethod
    def from_record(cls, raw: Any) -> Contract:
        """A contract from its JSON object already parsed (a model's metadata, train_meta.json's record)."""
        if not isinstance(raw, dict):
            raise ContractError("contract is not a JSON object")
        raw = dict(raw)  # the caller's record is not changed
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ContractError(f"contract has unknown fields: {', '.join(unknown)}")
        for key in ("class_names", "training_patients"):
            if key in raw and isinstance(raw[key], list):
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ContractError(f"contract does not fit schema: {exc}") from exc

    def replace(self, **changes: Any) -> Contract:
        return dataclasses.replace(self, **changes)


def contract_from_metadata(metadata: dict[str, str], source: str) -> Contract:
    """Read the contract from an ONNX model's custom metadata map."""
    text = metadata.get(CONTRACT_KEY)
    if text is None:
        raise ContractError(
            f"{source} has no '{CONTRACT_KEY}' metadata: it was not exported by idc-export, "
            "so its preprocessing is unknown and idc refuses to guess"
        )
    return Contract.from_json(text)
