"""How much of a patient is IDC: calibrated probabilities and three fraction estimators with intervals.

Counting patches over a threshold ("classify and count") is biased whenever sensitivity and
specificity are below 1: with specificity 0.75 a patient with 8% IDC reads ~30%. Quantification
corrects it (Forman 2008): the adjusted count (q - FPR) / (TPR - FPR), and the probabilistic
average of calibrated probabilities. Both need the model's own error, measured on validation
patients and carried in the contract; the intervals here carry it, including how much it varies
from one patient to the next, not only patch sampling. Pure numpy: shared by
idc-export (fits) and idc-infer (applies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EPS = 1e-6
MIN_PATIENT_PATCHES = 20  # a validation patient's own error rate counts only over this many patches of a class
FEW_PATCHES = 30  # fewer scored patches than this: the fraction says little (a note in summary.csv)
N_DRAWS = 4000
MIN_SEPARATION = 0.05  # TPR - FPR below this would divide by ~0: the adjusted count is then undefined
COLOUR_Z_LIMIT = 3.0  # a patient's mean colour this many training-patient SDs away, in any channel, is flagged


def colour_distance_sd(colour, reference: dict) -> float:
    """How far a patient's mean colour lies from the training patients': the largest |z| over R, G, B,
    in units of the training patients' spread (the contract's colour_reference)."""
    mean = np.asarray(reference["mean_rgb"], dtype=np.float64)
    sd = np.maximum(np.asarray(reference["std_rgb"], dtype=np.float64), 1e-6)
    return float(np.max(np.abs(np.asarray(colour, dtype=np.float64) - mean) / sd))


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def fit_platt(probs, labels, iterations: int = 100) -> tuple[float, float]:
    """Platt scaling on the model's log-odds: calibrated = sigmoid(a * logit(p) + b), by Newton's method.

    Two parameters, not temperature alone: class-weighted training shifts every probability up
    (a prior shift), which a temperature cannot undo. Platt's own smoothed targets
    ((n+ + 1) / (n+ + 2) and 1 / (n- + 2)) keep the fit finite on separable data.
    """
    z = logit(probs)
    labels = np.asarray(labels, dtype=np.float64)
    if len(labels) == 0 or labels.min() == labels.max():
        raise ValueError("calibration needs patches of both classes")
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    y = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    design = np.column_stack([z, np.ones_like(z)])

    def loss(params):  # cross-entropy against the smoothed targets
        s = design @ params
        return float(np.sum(np.logaddexp(0, s) - y * s))

    params = np.array([1.0, 0.0])
    current = loss(params)
    for _ in range(iterations):
        p = sigmoid(design @ params)
        gradient = design.T @ (p - y)
        hessian = (design * (p * (1 - p))[:, None]).T @ design + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6 and loss(params - scale * step) > current:  # damped: Newton alone can overshoot
            scale /= 2
        params = params - scale * step
        previous, current = current, loss(params)
        if abs(previous - current) < 1e-12 * max(1.0, abs(current)):
            break
    return float(params[0]), float(params[1])


def apply_calibration(probs, calibration: dict | None) -> np.ndarray:
    """The contract's calibration applied to raw model probabilities (identity when there is none)."""
    probs = np.asarray(probs, dtype=np.float64)
    if not calibration:
        return probs
    if calibration.get("method") != "platt":
        raise ValueError(f"unknown calibration method {calibration.get('method')!r}")
    return sigmoid(calibration["a"] * logit(probs) + calibration["b"])


def expected_calibration_error(probs, labels, bins: int = 10) -> float:
    """ECE over equal-width probability bins: sum over bins of |mean prob - IDC share| x bin weight."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if len(probs) == 0:
        return math.nan
    which = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for k in range(bins):
        inside = which == k
        if inside.any():
            total += inside.mean() * abs(probs[inside].mean() - labels[inside].mean())
    return float(total)


def brier_score(probs, labels) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    return float(np.mean((probs - np.asarray(labels, dtype=np.float64)) ** 2)) if len(probs) else math.nan


def adjusted_fraction(q: float, tpr: float, fpr: float) -> float:
    """Adjusted classify-and-count (Forman 2008): (q - FPR) / (TPR - FPR), clipped to [0, 1]."""
    if not (tpr - fpr) > MIN_SEPARATION:
        return math.nan
    return float(min(1.0, max(0.0, (q - fpr) / (tpr - fpr))))


def error_rates_record(labels, preds, patient_ids) -> dict:
    """What the contract carries of the model's error at its threshold, measured on validation patients:
    pooled counts, and each patient's own counts (so intervals carry the spread between patients)."""
    labels = np.asarray(labels, dtype=int)
    preds = np.asarray(preds, dtype=int)
    per_patient = [
        [pid, int(pos.sum()), int(preds[pos].sum()), int(neg.sum()), int(preds[neg].sum())]
        for pid, pos, neg in _patients_by_class(labels, patient_ids)
    ]
    tp = int(((labels == 1) & (preds == 1)).sum())
    fp = int(((labels == 0) & (preds == 1)).sum())
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    return {
        "tp": tp,
        "fn": n_pos - tp,
        "fp": fp,
        "tn": n_neg - fp,
        "sensitivity": tp / n_pos if n_pos else math.nan,
        "specificity": 1 - fp / n_neg if n_neg else math.nan,
        "per_patient": per_patient,
        "per_patient_columns": ["patient_id", "n_idc", "n_idc_called_idc", "n_non_idc", "n_non_idc_called_idc"],
    }


def class_mean_probs(probs, labels, patient_ids) -> list[list]:
    """Each validation patient's mean calibrated probability over its IDC and over its non-IDC patches,
    with the counts: [patient_id, n_idc, mean prob of IDC patches, n_non_idc, mean prob of non-IDC patches]
    (None where the patient has no patch of a class)."""
    probs = np.asarray(probs, dtype=np.float64)
    return [
        [
            pid,
            int(pos.sum()),
            float(probs[pos].mean()) if pos.any() else None,
            int(neg.sum()),
            float(probs[neg].mean()) if neg.any() else None,
        ]
        for pid, pos, neg in _patients_by_class(labels, patient_ids)
    ]


def _patients_by_class(labels, patient_ids):
    """(patient id, mask of its IDC patches, mask of its non-IDC patches) for each patient, in id order."""
    labels, pids = np.asarray(labels), np.asarray(patient_ids)
    for pid in sorted(set(pids.tolist())):
        mine = pids == pid
        yield str(pid), mine & (labels == 1), mine & (labels == 0)


def _class_mean_draws(rng, per_patient: Sequence, column: int, n: int, min_patches: int) -> np.ndarray:
    """A new patient's mean probability over one class (column 1: IDC, 3: non-IDC): a validation
    patient's, drawn at random among those with enough patches of that class."""
    values = [row[column + 1] for row in per_patient if row[column] >= min_patches]
    if not values:  # none with enough patches: every patient that has the class
        values = [row[column + 1] for row in per_patient if row[column] > 0]
    return np.asarray(values, dtype=np.float64)[rng.integers(0, len(values), n)]


def _rate_draws(rng, per_patient: Sequence, which: str, n: int, min_patches: int) -> np.ndarray:
    """Draws of a new patient's TPR (``which`` = "tpr") or FPR: a validation patient drawn at random,
    then its rate drawn from the Beta posterior of its own counts (Jeffreys prior)."""
    column_n, column_k = (1, 2) if which == "tpr" else (3, 4)
    counts = np.array(
        [(row[column_n], row[column_k]) for row in per_patient if row[column_n] >= min_patches], dtype=np.float64
    ).reshape(-1, 2)
    if len(counts) == 0:  # no patient with enough patches of this class: the pooled counts alone
        counts = np.array(
            [[sum(r[column_n] for r in per_patient), sum(r[column_k] for r in per_patient)]], dtype=np.float64
        )
    picked = counts[rng.integers(0, len(counts), n)]
    return rng.beta(picked[:, 1] + 0.5, picked[:, 0] - picked[:, 1] + 0.5)


def fraction_estimates(
    n_idc: int,
    n_scored: int,
    sum_prob: float,
    sum_prob_sq: float,
    error_rates: dict | None,
    class_means: Sequence | None,
    seed: int = 0,
    n_draws: int = N_DRAWS,
    level: float = 0.95,
) -> dict:
    """The adjusted count and the expected fraction of one patient, each with a 95% interval.

    Adjusted: Monte Carlo over the patient's observed share q (Beta posterior of n_idc of n_scored:
    patch sampling) and over the model's TPR and FPR on a new patient (a validation patient's own
    rates, drawn at random, with their count uncertainty): the interval holds the between-patient
    spread of the error rates, not only the pooled rates' sampling error.
    Expected (mean calibrated probability m): a patient with IDC share f reads m = f m1 + (1 - f) m0,
    where m1, m0 are its mean probabilities over IDC and non-IDC patches; with (m1, m0) drawn from
    single validation patients (as the rates above) and m from its patch-sampling error, the interval
    holds f = (m - m0) / (m1 - m0), clipped to [0, 1].
    Either is nan where the contract lacks what it needs (an older model: no error rates).
    """
    result = {
        key: math.nan
        for key in ("adjusted", "adjusted_low", "adjusted_high", "expected", "expected_low", "expected_high")
    }
    if n_scored <= 0:
        return result
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2 * 100
    q = n_idc / n_scored
    if (
        error_rates
        and error_rates.get("per_patient")
        and error_rates.get("sensitivity") is not None
        and error_rates.get("specificity") is not None
    ):  # null: a class was absent from validation
        tpr, fpr = error_rates["sensitivity"], 1 - error_rates["specificity"]
        result["adjusted"] = adjusted_fraction(q, tpr, fpr)
        q_draws = rng.beta(n_idc + 0.5, n_scored - n_idc + 0.5, n_draws)
        tpr_draws = _rate_draws(rng, error_rates["per_patient"], "tpr", n_draws, MIN_PATIENT_PATCHES)
        fpr_draws = _rate_draws(rng, error_rates["per_patient"], "fpr", n_draws, MIN_PATIENT_PATCHES)
        result["adjusted_low"], result["adjusted_high"] = _inverted_interval(q_draws, fpr_draws, tpr_draws, tail)
    mean = sum_prob / n_scored
    result["expected"] = float(mean)
    if class_means and any(r[1] for r in class_means) and any(r[3] for r in class_means):
        # The point stays the plain mean: corrected by the pooled class means (the probabilistic adjusted
        # count) it erred more on whole validation patients (0.077 vs 0.055 mean absolute error). The
        # interval is for the true share itself, so near 0 or 1 the mean can sit just outside it, toward
        # the middle: the mean's own bias there, which the interval does not share.
        variance = max(0.0, sum_prob_sq / n_scored - mean * mean)
        m_draws = mean + rng.normal(0, math.sqrt(variance / n_scored), n_draws)
        m1 = _class_mean_draws(rng, class_means, 1, n_draws, MIN_PATIENT_PATCHES)
        m0 = _class_mean_draws(rng, class_means, 3, n_draws, MIN_PATIENT_PATCHES)
        result["expected_low"], result["expected_high"] = _inverted_interval(m_draws, m0, m1, tail)
    return result


def _inverted_interval(
    observed: np.ndarray, at_none: np.ndarray, at_all: np.ndarray, tail: float
) -> tuple[float, float]:
    """Percentile interval of f = (observed - at_none) / (at_all - at_none), clipped to [0, 1]: the IDC
    share that gives the observed reading when a patient with none reads ``at_none`` and one with
    only IDC ``at_all`` (draws of each). nan where most draws cannot tell the two apart."""
    separation = at_all - at_none
    usable = separation > MIN_SEPARATION
    if usable.mean() <= 0.5:
        return math.nan, math.nan
    draws = np.clip((observed[usable] - at_none[usable]) / separation[usable], 0.0, 1.0)
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


ESTIMATOR_COLUMNS = {
    "counted": "idc_fraction",
    "adjusted": "idc_fraction_adjusted",
    "expected": "idc_fraction_expected",
}
ESTIMATOR_TITLES = {
    "counted": "IDC fraction, counted",
    "adjusted": "IDC fraction, adjusted",
    "expected": "IDC fraction, expected",
}
# One line each: what the number means and what it does not.
ESTIMATOR_TEXT = {
    "counted": "the share of scored patches at or above the threshold, with a Wilson interval for patch sampling "
    "only; biased whenever the model's sensitivity or specificity is below 1 (it over-reads patients "
    "with little IDC).",
    "adjusted": "the counted share corrected for the model's sensitivity and specificity measured on validation "
    "patients (adjusted count, Forman 2008); its interval carries patch sampling and how much those "
    "error rates vary from patient to patient. It estimates the share of this patient's scored patches "
    "that are IDC, not tumour area on the slide, and is no diagnosis.",
    "expected": "the mean calibrated IDC probability of the scored patches; its interval, for the true share, carries "
    "patch sampling and how much the model's mean probability on IDC and on non-IDC patches varies from "
    "one validation patient to the next (near 0 or 1 the mean can sit just outside it, toward the "
    "middle). It estimates the share of this patient's scored patches that are IDC, not tumour area on "
    "the slide, and is no diagnosis.",
}


def headline_of(contract, threshold: float | None = None) -> str:
    """The estimator the model's export measured best on whole validation patients ('counted' without one).

    At a --threshold other than the model's the adjusted count is not computed (its error rates hold
    at the model's threshold only): the expected fraction, else the count, leads then."""
    quant = getattr(contract, "quantification", None) or {}
    headline = quant.get("headline", "counted")
    if headline not in ESTIMATOR_COLUMNS:
        return "counted"
    if headline == "adjusted" and threshold is not None and threshold != contract.threshold:
        return "expected" if contract.calibration else "counted"
    return headline
