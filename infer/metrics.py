"""Pure numbers: fractions with intervals, confusion counts and the metrics the field reports.

Positive class = IDC. Sensitivity = TP / (TP + FN) (IDC patches called IDC); specificity =
TN / (TN + FP) (non-IDC patches called non-IDC). Shared by idc-infer and idc-eval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (nan, nan) when there are no trials."""
    if trials <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes {successes} outside [0, {trials}]")
    p = successes / trials
    z2 = z * z
    denom = 1.0 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denom
    # at 0 or n successes the bounds are exactly 0 or 1; rounding would leave 1e-17 or 0.9999...
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return (low, high)


def safe_ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary confusion matrix, positive = IDC."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @classmethod
    def from_labels(cls, labels, preds) -> Confusion:
        labels = np.asarray(labels, dtype=int)
        preds = np.asarray(preds, dtype=int)
        return cls(
            tp=int(np.sum((labels == 1) & (preds == 1))),
            fp=int(np.sum((labels == 0) & (preds == 1))),
            tn=int(np.sum((labels == 0) & (preds == 0))),
            fn=int(np.sum((labels == 1) & (preds == 0))),
        )

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def sensitivity(self) -> float:
        return safe_ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return safe_ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return safe_ratio(self.tp, self.tp + self.fp)

    @property
    def accuracy(self) -> float:
        return safe_ratio(self.tp + self.tn, self.n)

    @property
    def balanced_accuracy(self) -> float:
        """Mean of sensitivity and specificity; nan when either class is absent."""
        return (self.sensitivity + self.specificity) / 2

    @property
    def f1(self) -> float:
        return safe_ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan if one class."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    n_pos = int(np.sum(labels == 1))
    n_neg = int(np.sum(labels == 0))
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=float)
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum_pos = float(np.sum(ranks[labels == 1]))
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _threshold_counts(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """For each distinct score t (descending): TP and FP counts of the rule score >= t."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    positives = np.cumsum(labels[order] == 1)
    negatives = np.cumsum(labels[order] == 0)
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]  # ties share one threshold
    return (
        sorted_scores[last_of_run],
        positives[last_of_run],
        negatives[last_of_run],
        int(np.sum(labels == 1)),
        int(np.sum(labels == 0)),
    )


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds, from the highest threshold down."""
    thresholds, tp, fp, n_pos, n_neg = _threshold_counts(labels, scores)
    tpr = np.r_[0.0, tp / max(1, n_pos)]
    fpr = np.r_[0.0, fp / max(1, n_neg)]
    return fpr, tpr, np.r_[np.inf, thresholds]


def best_balanced_threshold(labels, scores) -> float:
    """The threshold on prob_idc that maximises balanced accuracy (pred = score >= threshold)."""
    thresholds, tp, fp, n_pos, n_neg = _threshold_counts(labels, scores)
    if n_pos == 0 or n_neg == 0 or len(thresholds) == 0:
        return 0.5
    balanced = (tp / n_pos + (n_neg - fp) / n_neg) / 2
    return float(thresholds[int(np.argmax(balanced))])  # argmax: the highest threshold among ties


def classification_metrics(labels, scores, threshold: float) -> dict[str, float | int]:
    """The metrics the field reports, at one threshold, as a flat JSON-able dict."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    conf = Confusion.from_labels(labels, scores >= threshold)
    return {
        "n": conf.n,
        "n_idc": int(np.sum(labels == 1)),
        "threshold": float(threshold),
        "tp": conf.tp,
        "fp": conf.fp,
        "tn": conf.tn,
        "fn": conf.fn,
        "accuracy": conf.accuracy,
        "sensitivity": conf.sensitivity,
        "specificity": conf.specificity,
        "balanced_accuracy": conf.balanced_accuracy,
        "precision": conf.precision,
        "f1": conf.f1,
        "roc_auc": roc_auc(labels, scores),
    }


def patient_bootstrap(
    patient_ids, statistic, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of ``statistic`` from a bootstrap over patients.

    ``statistic(index)`` takes an integer index array into the per-patch arrays and returns a
    dict of floats. Each replicate draws as many patients as there are, with replacement, and
    pools all patches of the drawn patients: the interval then carries the between-patient
    spread, which dominates when one patient's tissue is not like the next one's (a per-patch
    interval would pretend thousands of patches of a few patients were independent).
    Replicates where a value is nan (one class drawn only) are left out of that value's interval.
    """
    ids = np.asarray(patient_ids)
    if len(ids) == 0:
        return {}
    _, inverse = np.unique(ids, return_inverse=True)
    groups = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        picked = rng.integers(0, len(groups), len(groups))
        index = np.concatenate([groups[k] for k in picked])
        for key, value in statistic(index).items():
            draws.setdefault(key, []).append(value)
    tail = (1.0 - level) / 2 * 100
    intervals = {}
    for key, drawn in draws.items():
        values = np.asarray(drawn, dtype=float)
        values = values[~np.isnan(values)]
        intervals[key] = (
            (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
            if len(values)
            else (math.nan, math.nan)
        )
    return intervals
