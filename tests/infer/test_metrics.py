import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from idc_infer.metrics import Confusion, best_balanced_threshold, classification_metrics, roc_auc, wilson_interval


def test_hand_computed_confusion_matrix():
    # 4 IDC (3 called IDC), 6 non-IDC (1 called IDC)
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    c = Confusion.from_labels(labels, preds)
    assert (c.tp, c.fn, c.fp, c.tn) == (3, 1, 1, 5)
    assert c.sensitivity == pytest.approx(3 / 4)  # IDC found
    assert c.specificity == pytest.approx(5 / 6)  # non-IDC kept
    assert c.precision == pytest.approx(3 / 4)
    assert c.balanced_accuracy == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert c.f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_wilson_known_values():
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 20)[0] == 0.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@given(n=st.integers(1, 5000), data=st.data())
def test_wilson_contains_estimate(n, data):
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


def _brute_auc(labels, scores):
    pos = [s for s, l in zip(scores, labels) if l == 1]
    neg = [s for s, l in zip(scores, labels) if l == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@given(st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(0, 5)), min_size=2, max_size=60))
def test_auc_matches_pairwise_definition(pairs):
    labels = [l for l, _ in pairs]
    scores = [s / 5 for _, s in pairs]
    if len(set(labels)) < 2:
        assert math.isnan(roc_auc(labels, scores))
    else:
        assert roc_auc(labels, scores) == pytest.approx(_brute_auc(labels, scores))


def test_threshold_maximises_balanced_accuracy():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.05, 0.1, 0.3, 0.2, 0.35, 0.9])
    t = best_balanced_threshold(labels, scores)
    m = classification_metrics(labels, scores, t)
    assert m["balanced_accuracy"] == pytest.approx(5 / 6)
    assert classification_metrics(labels, scores, 0.5)["balanced_accuracy"] < m["balanced_accuracy"]


@given(st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(0, 8)), min_size=2, max_size=60))
def test_best_threshold_is_optimal_among_all_cut_points(pairs):
    labels = np.array([l for l, _ in pairs])
    scores = np.array([s / 8 for _, s in pairs])
    if len(set(labels.tolist())) < 2:
        return
    t = best_balanced_threshold(labels, scores)
    best = classification_metrics(labels, scores, t)["balanced_accuracy"]
    for candidate in np.unique(scores):
        assert classification_metrics(labels, scores, candidate)["balanced_accuracy"] <= best + 1e-12


def test_roc_curve_ends_at_corners_and_is_monotone():
    from idc_infer.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.4, 0.9]))


def test_patient_bootstrap_carries_the_spread_between_patients():
    """Ten patients of 500 patches: patch-level noise is tiny, but half the patients run at 0.2 and
    half at 0.8, so the interval of the pooled mean must be wide; equal patients give a narrow one."""
    from idc_infer.metrics import patient_bootstrap

    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(10), 500)
    split = np.where(pids < 5, 0.2, 0.8) + rng.normal(0, 0.01, len(pids))
    same = 0.5 + rng.normal(0, 0.01, len(pids))
    wide = patient_bootstrap(pids, lambda i: {"mean": float(split[i].mean())}, n_boot=400)["mean"]
    narrow = patient_bootstrap(pids, lambda i: {"mean": float(same[i].mean())}, n_boot=400)["mean"]
    assert wide[0] < 0.5 < wide[1] and wide[1] - wide[0] > 0.25
    assert narrow[1] - narrow[0] < 0.01


def test_patient_bootstrap_leaves_out_nan_replicates():
    from idc_infer.metrics import patient_bootstrap

    labels = np.array([1, 1, 0, 0])  # patient 0 has only IDC, patient 1 only non-IDC
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    result = patient_bootstrap([0, 0, 1, 1], lambda i: {"auc": roc_auc(labels[i], scores[i])}, n_boot=200)
    assert result["auc"] == (1.0, 1.0)  # replicates drawing one patient twice have no AUC and are skipped
