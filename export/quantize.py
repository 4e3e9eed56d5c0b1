"""Static int8 QDQ quantization with onnxruntime: seeded calibration on training patients, and the accuracy gate."""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from idc_infer.contract import CONTRACT_KEY, Contract
from idc_infer.errors import IdcError
from idc_infer.metrics import classification_metrics

log = logging.getLogger(__name__)

# Gate limits from the issue: int8 may cost at most this much against fp32 on held-out patients.
MAX_ROC_AUC_DROP = 0.005
MAX_BALANCED_ACCURACY_DROP = 0.01

ACTIVATION_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
WEIGHT_RANGES = ("full", "reduced")  # int8 weights in 8 bits, or 7 (no saturation on AVX2 without VNNI)
HEAD_PRECISIONS = ("float", "int8")  # the final Dense layer's
DEFAULT_CALIBRATION_PER_CLASS = 128
CALIBRATION_BATCH = 32


class QuantizationError(IdcError, RuntimeError):
    """Quantization cannot run: missing data, no split, or a model onnxruntime cannot quantize."""


@dataclass(frozen=True)
class QuantSettings:
    """One quantization recipe: static QDQ, int8 per-channel weights, Softmax always left in float.

    reduce_range stores weights in 7 bits: on x86 CPUs with AVX2 but no VNNI, onnxruntime's
    uint8 x int8 kernels (VPMADDUBSW) can saturate their 16-bit sums with full 8-bit weights.
    float_head also leaves the final Dense layer in float, so the logits are not rounded to 8 bits
    before Softmax (2x256 weights: no size cost worth counting).
    """

    activation_type: str = "uint8"
    calibration_method: str = "minmax"
    reduce_range: bool = False
    float_head: bool = True

    def __post_init__(self) -> None:
        if self.activation_type not in ACTIVATION_TYPES:
            raise ValueError(f"activation type {self.activation_type!r} not in {ACTIVATION_TYPES}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method {self.calibration_method!r} not in {CALIBRATION_METHODS}")

    @property
    def label(self) -> str:
        weights = "7-bit" if self.reduce_range else "8-bit"
        head = "float" if self.float_head else "int8"
        return f"{self.activation_type} activations / {self.calibration_method} / {weights} weights / {head} head"

    def as_dict(self) -> dict:
        return {
            "activation_type": self.activation_type,
            "calibration_method": self.calibration_method,
            "reduce_range": self.reduce_range,
            "float_head": self.float_head,
        }


def candidate_settings(
    activation_type: str = "auto",
    calibration_method: str = "auto",
    weight_range: str = "auto",
    head_precision: str = "float",
) -> list[QuantSettings]:
    """Every recipe to try; 'auto' on an axis tries all of that axis."""
    acts = ACTIVATION_TYPES if activation_type == "auto" else (activation_type,)
    methods = CALIBRATION_METHODS if calibration_method == "auto" else (calibration_method,)
    ranges = (False, True) if weight_range == "auto" else (weight_range == "reduced",)
    heads = (True, False) if head_precision == "auto" else (head_precision == "float",)
    return [QuantSettings(a, m, r, h) for m in methods for r in ranges for h in heads for a in acts]


@dataclass
class PatchSet:
    """Decoded patches (as the lab PC decodes them) with labels and where they came from."""

    tensors: np.ndarray
    labels: np.ndarray
    description: str
    patients: list[str] = field(default_factory=list)
    n_failed_decode: int = 0
    paths: frozenset[str] = frozenset()  # resolved paths of the patches, to keep other sets apart

    def __len__(self) -> int:
        return len(self.tensors)

    def summary(self) -> dict:
        return {
            "n_patches": len(self),
            "n_idc": int(np.sum(self.labels == 1)),
            "n_non_idc": int(np.sum(self.labels == 0)),
            "patients": self.patients,
            "description": self.description,
            "n_failed_decode": self.n_failed_decode,
        }


# --------------------------------------------------------------------------- data selection


def balanced_sample(
    patches: Sequence, n_per_class: int, seed: int, exclude: frozenset = frozenset(), max_fraction: float = 1.0
) -> list:
    """Up to n_per_class patches of each label (and at most max_fraction of that label's pool), seeded.

    Independent of discovery order: the pool is sorted by path before sampling.
    """
    rng = random.Random(seed)
    chosen = []
    for label in (0, 1):
        pool = sorted((p for p in patches if p.label == label and p.path not in exclude), key=lambda p: str(p.path))
        cap = len(pool) if max_fraction >= 1.0 else max(1, int(len(pool) * max_fraction))
        chosen += rng.sample(pool, min(n_per_class, cap, len(pool)))
    return sorted(chosen, key=lambda p: str(p.path))


def decode_patch_set(patches: Sequence, contract: Contract, description: str) -> PatchSet:
    """Decode with the infer-side decoder so calibration and gates see exactly what inference sees."""
    from idc_infer.preprocess import decode_file
    from idc_infer.schema import STATUS_OK

    tensors, labels, failed = [], [], 0
    for patch in patches:
        decoded = decode_file(patch.path, contract)
        if decoded.status != STATUS_OK:
            failed += 1
            continue
        tensors.append(decoded.ok_tensor())
        labels.append(patch.label)
    if failed:
        log.warning("%d patch(es) of %s could not be decoded and were left out", failed, description)
    shape = (0, contract.input_height_px, contract.input_width_px, 3)
    return PatchSet(
        np.stack(tensors) if tensors else np.zeros(shape, np.float32),
        np.asarray(labels, dtype=int),
        description,
        sorted({p.patient_id for p in patches}),
        failed,
        frozenset(str(Path(p.path).resolve()) for p in patches),
    )


def _split_ids(meta: dict | None, name: str) -> set[str]:
    return set((meta or {}).get("split", {}).get(name, []))


def calibration_pool(meta: dict | None, calibration_dir: Path | None) -> tuple[list, str]:
    """Labelled patches calibration may draw from: the training split, never validation or test patients."""
    from idc_train.data import discover_labelled

    train_ids = _split_ids(meta, "train")
    held_out = _split_ids(meta, "val") | _split_ids(meta, "test")
    if calibration_dir is None:
        if not meta or not meta.get("data_dir"):
            raise QuantizationError("no train_meta.json with data_dir beside the model: pass --calibration DATA_DIR")
        calibration_dir = Path(meta["data_dir"])
        if not calibration_dir.is_dir():
            raise QuantizationError(
                f"the training data {calibration_dir} (from train_meta.json) is not here: pass --calibration DATA_DIR"
            )
    patches = discover_labelled(Path(calibration_dir))
    in_train = [p for p in patches if p.patient_id in train_ids]
    if in_train:
        return in_train, f"training-split patients in {Path(calibration_dir).name}"  # no machine path in the card
    # The split's patients are not in this directory (another copy or another cohort): use what is
    # there, but never patients the model was validated or tested on.
    others = [p for p in patches if p.patient_id not in held_out]
    if not others:
        raise QuantizationError(
            f"no labelled patches usable for calibration under {calibration_dir} "
            "(none, or only validation/test patients)"
        )
    if train_ids:
        log.warning(
            "none of the split's training patients are in %s; calibrating on its other patients", calibration_dir
        )
    return others, (
        f"patches in {Path(calibration_dir).name} (not the split's training patients; validation/test "
        "patients excluded)"
    )


def _without_gate(pool: list, gate: PatchSet, where: str) -> tuple[list, str]:
    """The calibration pool less the accuracy gate's patches, and less its patients where that
    leaves others (without train_meta.json, --calibration and --gate-data may name the same ones)."""
    from idc_train.data import is_class_folder_id

    pool = [p for p in pool if str(Path(p.path).resolve()) not in gate.paths]  # never a gate patch
    if not pool:
        raise QuantizationError(
            "no calibration patches left once the accuracy gate's patches are set aside: "
            "give --calibration other patients than --gate-data"
        )
    pool_patients = {p.patient_id for p in pool}
    # class folders ("0", "benign") stand in for unknown patients: they say nothing about overlap
    overlap = sorted(pool_patients & {pid for pid in gate.patients if not is_class_folder_id(pid)})
    if overlap and len(overlap) < len(pool_patients):
        log.warning(
            "%d patient(s) of the accuracy gate left out of calibration: %s", len(overlap), ", ".join(overlap[:10])
        )
        return (
            [p for p in pool if p.patient_id not in overlap],
            where + f" ({len(overlap)} patient(s) of the accuracy gate left out)",
        )
    if overlap:  # every calibration patient is also gated (a per-patch split): other patches of them
        log.warning(
            "the accuracy gate's patients are all in the calibration data too (a per-patch split?): "
            "calibrating on their other patches; the gate is optimistic"
        )
        return pool, where + " (the gate's patients too, other patches of them: the gate is optimistic)"
    return pool, where


def calibration_sets(
    meta: dict | None,
    contract: Contract,
    calibration_dir: Path | None,
    n_per_class: int = DEFAULT_CALIBRATION_PER_CLASS,
    seed: int = 0,
    gate: PatchSet | None = None,
) -> tuple[PatchSet, PatchSet]:
    """The calibration sample and a disjoint selection sample (to choose a recipe) from the same pool.

    The accuracy gate's patches (and where possible its patients) never calibrate or choose the
    recipe: the gate stays a held-out check.
    """
    pool, where = calibration_pool(meta, calibration_dir)
    if gate is not None:
        pool, where = _without_gate(pool, gate, where)
    # a small pool is shared half and half, so the recipe is not chosen on a handful of patches
    calibration = balanced_sample(pool, n_per_class, seed, max_fraction=0.5)
    if {p.label for p in calibration} != {0, 1}:
        log.warning("calibration patches hold one class only: int8 ranges may not cover the other class")
    # The recipe is chosen on other training patches, so the validation gate stays an unbiased check.
    selection = balanced_sample(pool, n_per_class, seed + 1, exclude=frozenset(p.path for p in calibration))
    selection_where = "other " + where
    if not selection:
        selection, selection_where = calibration, where + " (the calibration patches themselves: no others left)"
    return (
        decode_patch_set(calibration, contract, f"seeded class-balanced sample (seed {seed}) of {where}"),
        decode_patch_set(selection, contract, f"seeded class-balanced sample (seed {seed + 1}) of {selection_where}"),
    )


def gate_set(meta: dict | None, contract: Contract, gate_dir: Path | None) -> PatchSet:
    """The labelled held-out set of the accuracy gate: --gate-data, else the split's validation patients."""
    from idc_train.data import discover_labelled

    train_ids = _split_ids(meta, "train")
    if gate_dir is not None:
        patches = discover_labelled(Path(gate_dir))
        description = f"labelled patches in {Path(gate_dir).name}"
        leaked = sorted({p.patient_id for p in patches} & train_ids)
        held_out = [p for p in patches if p.patient_id not in train_ids]
        if leaked and held_out:
            # calibration drew on the training patients: gating on them would flatter int8
            patches = held_out
            description += f" (its {len(leaked)} training-split patient(s) left out)"
        elif leaked:
            log.warning("gate data holds only training patients (%s): the gate is optimistic", ", ".join(leaked[:5]))
            description += " (training-split patients only: optimistic)"
    else:
        val_ids = _split_ids(meta, "val")
        data_dir = Path((meta or {}).get("data_dir", ""))
        if not val_ids or not data_dir.is_dir():
            raise QuantizationError(
                "no validation patients to gate on (train_meta.json split or data_dir missing): pass --gate-data DIR"
            )
        patches = [p for p in discover_labelled(data_dir) if p.patient_id in val_ids]
        description = f"validation-split patients in {data_dir.name}"
    if not patches:
        raise QuantizationError(f"no labelled patches for the accuracy gate ({description})")
    return decode_patch_set(patches, contract, description)


# --------------------------------------------------------------------------- quantization


def even_batch_size(n_items: int, max_batch: int = CALIBRATION_BATCH) -> int:
    """The largest batch size <= max_batch that divides n_items.

    onnxruntime's histogram calibrators (percentile, entropy) stack every batch's activations
    into one array and fail on a short last batch.
    """
    return next(b for b in range(min(max_batch, max(1, n_items)), 0, -1) if n_items % b == 0)


class ArrayCalibrationReader:
    """Feeds decoded patches to onnxruntime's calibrator in equal-size batches."""

    def __init__(self, input_name: str, tensors: np.ndarray, max_batch: int = CALIBRATION_BATCH):
        batch_size = even_batch_size(len(tensors), max_batch)
        self._batches = iter([{input_name: tensors[i : i + batch_size]} for i in range(0, len(tensors), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def _as_calibration_reader(input_name: str, tensors: np.ndarray):
    # subclassing onnxruntime's ABC lazily keeps `import idc_export.quantize` free of onnx imports
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(ArrayCalibrationReader, CalibrationDataReader):
        pass

    return Reader(input_name, tensors)


def preprocess_for_quantization(fp32_path: Path, out_path: Path) -> None:
    """Symbolic shape inference and graph optimisation, as onnxruntime recommends before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path))


def float_nodes(onnx_path: Path, float_head: bool) -> list[str]:
    """Nodes to leave in float: every Softmax (8-bit probabilities lose resolution for nothing) and,
    with float_head, the Dense layer feeding it (Gemm, or MatMul + Add)."""
    import onnx

    nodes = list(onnx.load(str(onnx_path)).graph.node)
    producer = {out: node for node in nodes for out in node.output}
    names = []
    for node in nodes:
        if node.op_type != "Softmax":
            continue
        names.append(node.name)
        feeder = producer.get(node.input[0])
        while float_head and feeder is not None and feeder.op_type in ("Gemm", "MatMul", "Add"):
            names.append(feeder.name)
            if feeder.op_type != "Add":
                break
            feeder = next((producer[i] for i in feeder.input if i in producer), None)
    return names


# onnxruntime's Entropy defaults (128 histogram bins, 128 quantized bins) leave one candidate
# threshold, the full range, so "entropy" would silently equal MinMax; TensorRT's recipe uses 2048.
CALIBRATOR_OPTIONS = {
    "minmax": {},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
}


def _ort_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[name]


def calibrate_ranges(pre_path: Path, tensors: np.ndarray, method: str, cache_path: Path) -> None:
    """Activation ranges of one calibration method, saved as an onnxruntime calibration cache.

    Calibrating once per method (not once per recipe) and passing the cache to quantize_static
    makes each further recipe cost only the graph rewrite.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if len(tensors) == 0:
        raise QuantizationError("no calibration patches could be decoded")
    input_name = _input_name(pre_path)
    # Every calibrator holds all batches' activations (~4 MB a patch) until the end. Its
    # max_intermediate_outputs option is not used: in onnxruntime 1.32 MinMax drops the held
    # batches at that count instead of folding them into the ranges.
    calibrator = create_calibrator(
        pre_path,
        None,
        augmented_model_path=str(cache_path.with_suffix(".augmented.onnx")),
        calibrate_method=_ort_method(method),
        extra_options=CALIBRATOR_OPTIONS[method],
    )
    calibrator.collect_data(_as_calibration_reader(input_name, tensors))
    save_tensors_data(calibrator.compute_data(), cache_path)


def _input_name(onnx_path: Path) -> str:
    import onnx

    return onnx.load(str(onnx_path)).graph.input[0].name


def quantize_qdq(
    pre_path: Path, out_path: Path, settings: QuantSettings, nodes_to_exclude: list[str], cache_path: Path
) -> None:
    """One static QDQ quantization with int8 per-channel weights, from cached activation ranges."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[settings.activation_type]
    quantize_static(
        str(pre_path),
        str(out_path),
        None,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=settings.reduce_range,
        activation_type=act,
        weight_type=QuantType.QInt8,
        calibrate_method=_ort_method(settings.calibration_method),
        nodes_to_exclude=nodes_to_exclude,
        calibration_cache_path=str(cache_path),
    )


def file_prob_idc(
    model: Path | bytes, tensors: np.ndarray, positive_index: int = 1, batch_size: int = 256
) -> np.ndarray:
    """Positive-class probabilities of a model file or its bytes, from onnxruntime (the lab PC's runtime)."""
    from idc_infer.model import cpu_session, session_prob_idc

    return session_prob_idc(cpu_session(model), tensors, positive_index, batch_size)


# --------------------------------------------------------------------------- gates


def fidelity(fp32_probs: np.ndarray, int8_probs: np.ndarray, threshold: float) -> dict:
    """How closely int8 follows fp32, with no labels needed."""
    diff = np.abs(np.asarray(int8_probs, float) - np.asarray(fp32_probs, float))
    flips = int(np.sum((np.asarray(int8_probs) >= threshold) != (np.asarray(fp32_probs) >= threshold)))
    return {
        "n": int(diff.size),
        "label_flips": flips,
        "max_abs_prob_diff": float(diff.max()) if diff.size else math.nan,
        "mean_abs_prob_diff": float(diff.mean()) if diff.size else math.nan,
    }


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    numbers: dict

    def as_dict(self) -> dict:
        """JSON-safe: an undefined metric (one class only) becomes null, not the non-standard NaN."""
        numbers = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in self.numbers.items()}
        return {"passed": self.passed, "reasons": list(self.reasons), **numbers}


def accuracy_gate(
    labels: np.ndarray,
    fp32_probs: np.ndarray,
    int8_probs: np.ndarray,
    threshold: float,
    max_auc_drop: float = MAX_ROC_AUC_DROP,
    max_bacc_drop: float = MAX_BALANCED_ACCURACY_DROP,
) -> GateResult:
    """int8 against fp32 on held-out labelled patches: ROC-AUC and balanced-accuracy drops within limits."""
    fp32 = classification_metrics(labels, fp32_probs, threshold)
    int8 = classification_metrics(labels, int8_probs, threshold)
    auc_drop = fp32["roc_auc"] - int8["roc_auc"]
    bacc_drop = fp32["balanced_accuracy"] - int8["balanced_accuracy"]
    numbers = {
        "threshold": float(threshold),
        "n_patches": int(len(labels)),
        "n_idc": int(np.sum(np.asarray(labels) == 1)),
        "fp32_roc_auc": fp32["roc_auc"],
        "int8_roc_auc": int8["roc_auc"],
        "roc_auc_drop": auc_drop,
        "fp32_balanced_accuracy": fp32["balanced_accuracy"],
        "int8_balanced_accuracy": int8["balanced_accuracy"],
        "balanced_accuracy_drop": bacc_drop,
        "max_roc_auc_drop": max_auc_drop,
        "max_balanced_accuracy_drop": max_bacc_drop,
        **{k: v for k, v in fidelity(fp32_probs, int8_probs, threshold).items() if k != "n"},
    }
    reasons = []
    if math.isnan(auc_drop) or math.isnan(bacc_drop):
        reasons.append(
            f"the gate data needs patches of both classes (has {numbers['n_idc']} IDC of {len(labels)}): "
            "the int8 model cannot be checked"
        )
    else:
        if not auc_drop <= max_auc_drop:
            reasons.append(
                f"ROC-AUC dropped by {auc_drop:.4f} ({fp32['roc_auc']:.4f} -> {int8['roc_auc']:.4f}), "
                f"limit {max_auc_drop}"
            )
        if not bacc_drop <= max_bacc_drop:
            reasons.append(
                f"balanced accuracy at threshold {threshold:.3f} dropped by {bacc_drop:.4f} "
                f"({fp32['balanced_accuracy']:.4f} -> {int8['balanced_accuracy']:.4f}), limit {max_bacc_drop}"
            )
    return GateResult(not reasons, tuple(reasons), numbers)


# --------------------------------------------------------------------------- the whole int8 export


def selection_key(result: dict) -> tuple:
    """Smallest mean |prob diff| against fp32, then fewest label flips, then smallest max |diff|.

    The mean is the primary key because it moves with every patch, where a few flips on a
    few hundred selection patches are mostly noise. Ties keep the earlier candidate: uint8
    activations come first because asymmetric int8 and uint8 put the same grid on ReLU outputs
    (equal accuracy) and uint8 ran faster on this project's CPUs (docs/STACK.md).
    """
    return (round(result["mean_abs_prob_diff"], 6), result["label_flips"], round(result["max_abs_prob_diff"], 6))


def read_contract(onnx_path: Path) -> Contract:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    return Contract.from_json(props[CONTRACT_KEY])


def int8_contract(
    fp32_contract: Contract,
    settings: QuantSettings,
    calibration: PatchSet,
    gate: GateResult,
    excluded: list[str],
    fp32_sha256: str,
    chosen_by: str,
    gate_description: str = "validation patients",
) -> Contract:
    """The fp32 contract with the int8 export settings and gate results added to its provenance."""
    import onnxruntime

    provenance = dict(fp32_contract.provenance)
    export = dict(provenance.get("export", {}))
    if "parity" in export:  # that gate was run on the fp32 graph, not on this one
        export["fp32_parity"] = export.pop("parity")
    export.update(
        {
            "precision": "int8",
            "quantizer": "onnxruntime.quantization static QDQ",
            "onnxruntime": onnxruntime.__version__,
            "activation_type": settings.activation_type,
            "weight_type": "int8 per-channel" + (" (7-bit range)" if settings.reduce_range else ""),
            "reduce_range": settings.reduce_range,
            "calibration_method": settings.calibration_method,
            "float_head": settings.float_head,
            "calibration_patches": len(calibration),
            "calibration_idc_patches": int(np.sum(calibration.labels == 1)),
            "calibration_patients": len(calibration.patients),
            "calibration_data": calibration.description,
            "nodes_left_in_float": excluded,
            "recipe_chosen_by": chosen_by,
            "fp32_sha256": fp32_sha256,
        }
    )
    provenance["export"] = export
    # the metrics a lab PC announces for this file are this file's, measured by the gate; the fp32 file's
    # (training's held-out evaluation) are kept under their own name
    numbers = gate.as_dict()
    provenance["fp32_metrics"] = provenance.pop("metrics", {})
    provenance["fp32_metrics_on"] = provenance.pop("metrics_on", None)
    if "all_metrics" in provenance:
        provenance["fp32_all_metrics"] = provenance.pop("all_metrics")
    provenance["metrics"] = {
        "roc_auc": numbers["int8_roc_auc"],
        "balanced_accuracy": numbers["int8_balanced_accuracy"],
        "n": numbers["n_patches"],
        "n_idc": numbers["n_idc"],
        "threshold": numbers["threshold"],
    }
    provenance["metrics_on"] = f"this int8 file, on its accuracy gate's patches ({gate_description})"
    provenance["quantization_gate"] = "passed" if gate.passed else "failed"
    provenance["quantization_gate_results"] = gate.as_dict()
    return fp32_contract.replace(provenance=provenance)


def quantize_int8(
    fp32_path: Path,
    calibration: PatchSet,
    selection: PatchSet,
    gate: PatchSet,
    candidates: Sequence[QuantSettings],
    work_dir: Path | None = None,
) -> tuple[bytes, dict]:
    """Quantize with each candidate recipe, keep the most faithful on the selection set, gate it.

    Returns the int8 model bytes (contract inside, gate verdict in its provenance) and a report.
    """
    import onnx

    from idc_infer.model import sha256_of

    from .convert import set_contract

    if not candidates:
        raise QuantizationError("no quantization recipe to try")
    fp32_path = Path(fp32_path)
    contract = read_contract(fp32_path)
    pos = contract.positive_class_index
    fp32_sha = sha256_of(fp32_path)
    with tempfile.TemporaryDirectory(prefix="idc-quant-", dir=work_dir) as tmp:
        pre = Path(tmp) / "pre.onnx"
        preprocess_for_quantization(fp32_path, pre)
        fp32_selection = file_prob_idc(fp32_path, selection.tensors, pos)
        caches: dict[str, Path] = {}
        tried = []
        best_bytes: bytes | None = None
        best: tuple[QuantSettings, dict] | None = None
        for i, settings in enumerate(candidates):
            method = settings.calibration_method
            if method not in caches:
                caches[method] = Path(tmp) / f"ranges-{method}.json"
                calibrate_ranges(pre, calibration.tensors, method, caches[method])
            out = Path(tmp) / f"candidate-{i}.onnx"
            excluded = float_nodes(pre, settings.float_head)
            quantize_qdq(pre, out, settings, excluded, caches[method])
            data = out.read_bytes()
            result = {
                **settings.as_dict(),
                "nodes_left_in_float": excluded,
                "size_bytes": len(data),
                **fidelity(fp32_selection, file_prob_idc(data, selection.tensors, pos), contract.threshold),
            }
            tried.append(result)
            log.info(
                "int8 %s: %d flips, mean |diff| %.4f, max |diff| %.4f on %d selection patches",
                settings.label,
                result["label_flips"],
                result["mean_abs_prob_diff"],
                result["max_abs_prob_diff"],
                len(selection),
            )
            if best is None or selection_key(result) < selection_key(best[1]):
                best_bytes, best = data, (settings, result)
    assert best is not None and best_bytes is not None  # candidates is not empty: one was kept
    settings, best_result = best
    excluded = best_result["nodes_left_in_float"]
    int8_probs = file_prob_idc(best_bytes, gate.tensors, pos)
    fp32_probs = file_prob_idc(fp32_path, gate.tensors, pos)
    verdict = accuracy_gate(gate.labels, fp32_probs, int8_probs, contract.threshold)
    chosen_by = (
        f"smallest mean |prob diff| vs fp32, then fewest label flips, on {len(selection)} patches "
        f"({selection.description}), among {len(tried)} recipe(s)"
    )
    int8_model = onnx.load_from_string(best_bytes)
    new_contract = int8_contract(
        contract, settings, calibration, verdict, excluded, fp32_sha, chosen_by, gate.description
    )
    set_contract(int8_model, new_contract)
    data = int8_model.SerializeToString()
    report = {
        "chosen": {**settings.as_dict(), "chosen_by": chosen_by},
        "candidates": tried,
        "calibration": calibration.summary(),
        "selection": selection.summary(),
        "gate_data": gate.summary(),
        "gate": verdict.as_dict(),
        "nodes_left_in_float": excluded,
        "contract": json.loads(new_contract.to_json()),
    }
    return data, report
