"""Calibration and validated error rates of an exported model, fitted on the split's validation patients.

Each file (fp32, int8) gets its own fit on its own outputs: a Platt calibration of prob_idc, the
threshold carried into calibrated space, sensitivity/specificity with each validation patient's
counts, each validation patient's mean calibrated probability per class, and a leave-one-patient-out
measurement of the three fraction estimators (counted, adjusted, expected) on the validation patients, which picks the
headline estimator. The training patients' ids and mean colours go into the contract too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idc_infer.contract import Contract
from idc_infer.preprocess import patch_mean_colour
from idc_infer.quantify import (
    COLOUR_Z_LIMIT,
    apply_calibration,
    brier_score,
    class_mean_probs,
    colour_distance_sd,
    error_rates_record,
    expected_calibration_error,
    fit_platt,
    fraction_estimates,
    logit,
    sigmoid,
)

if TYPE_CHECKING:
    from idc_train.data import LabelledPatch, SampleDesign

log = logging.getLogger(__name__)

ESTIMATORS = ("counted", "adjusted", "expected")
COLOUR_PATCHES_PER_PATIENT = 100


@dataclass
class ValidationScores:
    """The validation patients' patches, decoded once for every file fitted on them, and one file's raw
    (uncalibrated) outputs on them (``raw``, set per file)."""

    tensors: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    uniform: np.ndarray  # bool: the patch is part of its patient's uniform random sample
    colours: np.ndarray  # per-patch mean RGB on [0, 1]
    whole_patients: frozenset
    raw: np.ndarray | None = None


def validation_patches(meta: dict | None) -> tuple[list[LabelledPatch], SampleDesign | None]:
    """The split's validation patches (LabelledPatch) and the data's sample design."""
    from idc_train.data import discover_labelled, read_sample_design

    meta = meta or {}
    data_dir = Path(meta.get("data_dir", ""))
    val_ids = set(meta.get("split", {}).get("val", []))
    if not val_ids or not data_dir.is_dir():
        return [], None
    return [p for p in discover_labelled(data_dir) if p.patient_id in val_ids], read_sample_design(data_dir)


def decode_tensors(patches, contract: Contract):
    """Decoded tensors (infer-side decoder) of the patches that decode, and those patches."""
    from idc_infer.preprocess import decode_file
    from idc_infer.schema import STATUS_OK

    tensors, kept, colours = [], [], []
    for patch in patches:
        decoded = decode_file(patch.path, contract)
        if decoded.status == STATUS_OK:
            tensors.append(decoded.ok_tensor())
            colours.append(patch_mean_colour(decoded.ok_rgb()))
            kept.append(patch)
    return np.stack(tensors), kept, np.asarray(colours)


def colour_flags(colours: np.ndarray, patient_ids: np.ndarray, reference: dict | None) -> dict | None:
    """How far each validation patient's mean colour lies from the training patients' (max |z| over
    R, G, B), and how many idc-infer would flag: the measured false-alarm rate of the colour note."""
    if not reference:
        return None
    per_patient = {
        str(pid): round(colour_distance_sd(colours[patient_ids == pid].mean(axis=0), reference), 2)
        for pid in sorted(set(patient_ids.tolist()))
    }
    flagged = sorted(pid for pid, z in per_patient.items() if z > COLOUR_Z_LIMIT)
    return {
        "z_limit": COLOUR_Z_LIMIT,
        "max_abs_z": per_patient,
        "flagged": flagged,
        "flagged_share": len(flagged) / max(1, len(per_patient)),
    }


def raw_probs(model_path: Path, tensors: np.ndarray) -> np.ndarray:
    from idc_infer.model import load_model

    model = load_model(model_path, threads=2)
    return np.concatenate([model.raw_prob_idc(tensors[i : i + 256]) for i in range(0, len(tensors), 256)])


def colour_reference(meta: dict | None, contract: Contract, seed: int = 0) -> dict | None:
    """Mean and SD over training patients of each patient's mean patch colour (RGB on [0, 1]); up to
    COLOUR_PATCHES_PER_PATIENT patches per patient, seeded."""
    import random

    from idc_infer.preprocess import decode_file
    from idc_infer.schema import STATUS_OK
    from idc_train.data import discover_labelled

    meta = meta or {}
    data_dir = Path(meta.get("data_dir", ""))
    train_ids = set(meta.get("split", {}).get("train", []))
    if not train_ids or not data_dir.is_dir():
        return None
    by_patient: dict[str, list] = {}
    for patch in discover_labelled(data_dir):
        if patch.patient_id in train_ids:
            by_patient.setdefault(patch.patient_id, []).append(patch)
    rng = random.Random(seed)
    means = []
    for pid in sorted(by_patient):
        patches = by_patient[pid]
        colours = []
        for patch in rng.sample(patches, min(COLOUR_PATCHES_PER_PATIENT, len(patches))):
            decoded = decode_file(patch.path, contract)
            if decoded.status == STATUS_OK:
                colours.append(patch_mean_colour(decoded.ok_rgb()))
        if colours:
            means.append(np.mean(colours, axis=0))
    if len(means) < 2:
        return None
    table = np.asarray(means)
    return {
        "mean_rgb": table.mean(axis=0).round(5).tolist(),
        "std_rgb": table.std(axis=0, ddof=1).round(5).tolist(),
        "n_patients": len(table),
        "what": "per-patient mean patch colour (RGB, 0-1) of the training patients",
    }


def _fit(scores: ValidationScores, raw_threshold: float, keep: np.ndarray) -> dict:
    """Calibration, calibrated threshold, error rates and per-class mean probabilities from the patches
    where ``keep``."""
    raw = scores.raw
    assert raw is not None  # set per file before fitting
    uniform = keep & scores.uniform
    # the uniform sample when it is big enough and holds both classes, else every kept patch
    fit_on = uniform if uniform.sum() >= 50 and len(set(scores.labels[uniform].tolist())) == 2 else keep
    a, b = fit_platt(raw[fit_on], scores.labels[fit_on])
    calibration = {"method": "platt", "a": a, "b": b}
    probs = apply_calibration(raw, calibration)
    threshold = float(sigmoid(a * logit(raw_threshold) + b))
    preds = raw >= raw_threshold  # the same calls as at the raw threshold (a > 0: monotone)
    rates = error_rates_record(scores.labels[keep], preds[keep], scores.patient_ids[keep])
    class_means = class_mean_probs(probs[keep], scores.labels[keep], scores.patient_ids[keep])
    return {
        "calibration": calibration,
        "threshold": threshold,
        "error_rates": rates,
        "class_means": class_means,
        "probs": probs,
        "preds": preds,
        "fit_on": fit_on,
    }


def _patient_estimates(scores: ValidationScores, fit: dict, pid) -> dict:
    from idc_infer.metrics import wilson_interval

    mine = scores.patient_ids == pid
    probs = fit["probs"][mine]
    n, n_idc = int(mine.sum()), int(fit["preds"][mine].sum())
    est = fraction_estimates(
        n_idc, n, float(probs.sum()), float((probs**2).sum()), fit["error_rates"], fit["class_means"]
    )
    low, high = wilson_interval(n_idc, n)
    return {
        "patient_id": str(pid),
        "n": n,
        "true": float(scores.labels[mine].mean()),
        "counted": n_idc / n,
        "counted_low": low,
        "counted_high": high,
        **est,
    }


def measure_estimators(scores: ValidationScores, raw_threshold: float) -> dict:
    """Leave-one-patient-out: for each validation patient, fit on the others, estimate its fraction.

    Errors and interval coverage for each estimator, over whole patients (the slide's true fraction)
    and over all validation patients (the true share of the patches they hold)."""
    rows = []
    for pid in sorted(set(scores.patient_ids.tolist())):
        others = scores.patient_ids != pid
        if len(set(scores.labels[others].tolist())) < 2:
            continue
        try:
            fit = _fit(scores, raw_threshold, others)
        except (ValueError, np.linalg.LinAlgError) as exc:  # one fold that cannot be fitted must not stop the export
            log.warning("leave-one-out fold without patient %s could not be fitted (%s): left out", pid, exc)
            continue
        rows.append({**_patient_estimates(scores, fit, pid), "whole_patient": str(pid) in scores.whole_patients})

    def summarise(subset: list[dict]) -> dict:
        # every estimator on the same patients: those where all three are defined
        subset = [r for r in subset if not any(math.isnan(r[name]) for name in ESTIMATORS)]
        out: dict[str, Any] = {"n_patients": len(subset)}
        for name in ESTIMATORS:
            errors = [abs(r[name] - r["true"]) for r in subset]
            with_interval = [r for r in subset if not math.isnan(r[f"{name}_low"])]
            covered = [r[f"{name}_low"] <= r["true"] <= r[f"{name}_high"] for r in with_interval]
            widths = [r[f"{name}_high"] - r[f"{name}_low"] for r in with_interval]
            out[name] = {
                "mae": float(np.mean(errors)) if errors else math.nan,
                "max_error": float(np.max(errors)) if errors else math.nan,
                "coverage_95": float(np.mean(covered)) if covered else math.nan,
                "mean_interval_width": float(np.mean(widths)) if widths else math.nan,
                "n": len(subset),
            }
        return out

    whole = [r for r in rows if r["whole_patient"]]
    measured: dict[str, Any] = {
        "method": "leave one validation patient out: calibration, error rates and per-class mean "
        "probabilities fitted on the other validation patients",
        "patients": rows,
        "all_validation_patients": summarise(rows),
    }
    if whole:
        measured["whole_patients"] = summarise(whole)
    basis = measured.get("whole_patients", measured["all_validation_patients"])
    candidates = [name for name in ESTIMATORS if not math.isnan(basis[name]["mae"])]
    if candidates:
        measured["headline"] = min(candidates, key=lambda name: basis[name]["mae"])
        measured["headline_chosen_on"] = "whole validation patients" if whole else "all validation patients"
        measured["headline_why"] = (
            f"the estimator with the lowest mean absolute error on "
            f"{measured['headline_chosen_on']}, each left out of the fit in turn"
        )
    else:  # one validation patient: nothing left to fit on when it is left out
        measured["headline"] = "counted"
        measured["headline_chosen_on"] = measured["headline_why"] = (
            "not measured (too few validation patients): the plain count"
        )
    return measured


def validation_set(meta: dict | None, contract: Contract) -> ValidationScores:
    """Decode the split's validation patches (ValueError when there are none of both classes)."""
    patches, design = validation_patches(meta)
    if not patches or design is None or len({p.label for p in patches}) < 2:  # design: None only without patches
        raise ValueError("no validation patients of both classes in train_meta.json's split: no calibration")
    tensors, kept, colours = decode_tensors(patches, contract)
    return ValidationScores(
        tensors,
        np.array([p.label for p in kept]),
        np.array([p.patient_id for p in kept]),
        np.array([Path(p.path) in design.uniform for p in kept], dtype=bool),
        colours,
        design.whole_patients,
    )


def quantify_model(
    model_path: Path, contract: Contract, meta: dict | None, colour: dict | None, validation: ValidationScores
) -> tuple[Contract, dict]:
    """The contract with calibration, calibrated threshold, error rates, training patients and colour
    reference, fitted on this file's own outputs; and the report of the fit (ECE, Brier, estimator errors)."""
    raw = raw_probs(model_path, validation.tensors)
    scores = replace(validation, raw=raw)
    everything = np.ones(len(raw), dtype=bool)
    fit = _fit(scores, contract.threshold, everything)
    fit_on = fit["fit_on"]
    measured = measure_estimators(scores, contract.threshold)
    where = (
        "uniform-sample patches of the validation patients"
        if fit_on.sum() < len(fit_on)
        else "all patches of the validation patients"
    )
    calibration = {
        **fit["calibration"],
        "fitted_on": where,
        "n_patches": int(fit_on.sum()),
        "n_patients": len(set(scores.patient_ids[fit_on].tolist())),
    }
    report = {
        "calibration": calibration,
        "raw_threshold": contract.threshold,
        "threshold": fit["threshold"],
        "ece_before": expected_calibration_error(raw[fit_on], scores.labels[fit_on]),
        "ece_after": expected_calibration_error(fit["probs"][fit_on], scores.labels[fit_on]),
        "brier_before": brier_score(raw[fit_on], scores.labels[fit_on]),
        "brier_after": brier_score(fit["probs"][fit_on], scores.labels[fit_on]),
        "calibration_measured_on": f"{where} (in-sample: the same patches the fit used)",
        "estimators": measured,
        "colour_of_validation_patients": colour_flags(scores.colours, scores.patient_ids, colour),
    }
    rates = fit["error_rates"]
    quantification = {
        "error_rates": rates,
        "class_mean_probs": fit["class_means"],
        "class_mean_probs_columns": [
            "patient_id",
            "n_idc",
            "mean_prob_of_idc_patches",
            "n_non_idc",
            "mean_prob_of_non_idc_patches",
        ],
        "measured_on": f"all patches of {len(set(scores.patient_ids.tolist()))} validation patients",
        "validation_patients": sorted(set(scores.patient_ids.tolist())),
        "headline": measured["headline"],
        "headline_why": measured["headline_why"],
        "estimator_errors": {k: v for k, v in measured.items() if k in ("whole_patients", "all_validation_patients")},
    }
    updated = contract.replace(
        threshold=fit["threshold"],
        calibration=calibration,
        quantification=quantification,
        training_patients=tuple(sorted((meta or {}).get("split", {}).get("train", []))),
        colour_reference=colour,
    )
    log.info(
        "calibration: a %.3f b %.3f, ECE %.4f -> %.4f; sensitivity %.3f specificity %.3f; headline %s",
        calibration["a"],
        calibration["b"],
        report["ece_before"],
        report["ece_after"],
        rates["sensitivity"],
        rates["specificity"],
        measured["headline"],
    )
    return updated, report


def rewrite_contract(model_path: Path, contract: Contract) -> None:
    """Replace the contract in an ONNX file's metadata (atomically); the graph is untouched."""
    import onnx

    from idc_infer.files import atomic_path

    from .convert import set_contract

    model = onnx.load(str(model_path))
    set_contract(model, contract)
    with atomic_path(Path(model_path), mode="wb") as handle:
        handle.write(model.SerializeToString())
