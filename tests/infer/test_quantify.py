"""Calibrated probabilities and the three IDC-fraction estimators, checked by hand on small cases."""

import math

import numpy as np
import pytest

from idc_infer.quantify import (
    adjusted_fraction,
    apply_calibration,
    brier_score,
    error_rates_record,
    expected_calibration_error,
    fit_platt,
    fraction_estimates,
    sigmoid,
)


def test_adjusted_count_by_hand():
    # specificity 0.75 (FPR 0.25), sensitivity 0.9: a patient with 8% IDC reads 0.08 * 0.9 + 0.92 * 0.25 = 0.302
    q = 0.08 * 0.9 + 0.92 * 0.25
    assert q == pytest.approx(0.302)
    assert adjusted_fraction(q, 0.9, 0.25) == pytest.approx(0.08)
    assert adjusted_fraction(0.1, 0.9, 0.25) == 0.0  # below FPR: clipped
    assert adjusted_fraction(0.95, 0.9, 0.25) == 1.0
    assert math.isnan(adjusted_fraction(0.5, 0.52, 0.5))  # TPR ~ FPR: undefined, not a huge number


def test_platt_fit_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 20000)
    labels = rng.uniform(size=true_logit.size) < sigmoid(true_logit)
    raw = sigmoid((true_logit - 1.0) / 0.5)  # over-confident and shifted: raw logit = 2 z - 2
    a, b = fit_platt(raw, labels)
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(1.0, abs=0.06)
    calibrated = apply_calibration(raw, {"method": "platt", "a": a, "b": b})
    assert expected_calibration_error(calibrated, labels) < 0.02 < expected_calibration_error(raw, labels)
    assert brier_score(calibrated, labels) < brier_score(raw, labels)


def test_platt_fit_stays_finite_on_separable_data():
    a, b = fit_platt([0.001, 0.002, 0.003, 0.9, 0.95, 0.99], [0, 0, 0, 1, 1, 1])
    assert 0 < a < 10 and math.isfinite(b)


def test_error_rates_keep_each_patients_counts():
    rates = error_rates_record([1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 0], ["a", "a", "a", "b", "b", "b"])
    assert (rates["tp"], rates["fn"], rates["fp"], rates["tn"]) == (2, 1, 1, 2)
    assert rates["sensitivity"] == pytest.approx(2 / 3) and rates["specificity"] == pytest.approx(2 / 3)
    assert rates["per_patient"] == [["a", 2, 1, 1, 1], ["b", 1, 1, 2, 0]]


def _rates(per_patient):
    tp = sum(r[2] for r in per_patient)
    n_pos = sum(r[1] for r in per_patient)
    fp = sum(r[4] for r in per_patient)
    n_neg = sum(r[3] for r in per_patient)
    return {"sensitivity": tp / n_pos, "specificity": 1 - fp / n_neg, "per_patient": per_patient}


def test_adjusted_interval_holds_the_spread_between_patients():
    """Same pooled rates, but in one model every validation patient has them, in the other patients
    swing between FPR 0.05 and 0.45: the second interval must be much wider, both contain the point."""
    steady = _rates([[f"p{i}", 200, 180, 800, 200] for i in range(10)])  # TPR 0.9, FPR 0.25 each
    swinging = _rates([[f"p{i}", 200, 180, 800, 40 if i % 2 else 360] for i in range(10)])  # FPR 0.05 / 0.45
    assert swinging["specificity"] == pytest.approx(steady["specificity"])
    n, n_idc = 1000, 302
    a = fraction_estimates(n_idc, n, 300.0, 150.0, steady, None)
    b = fraction_estimates(n_idc, n, 300.0, 150.0, swinging, None)
    assert a["adjusted"] == pytest.approx(0.08, abs=1e-3) == b["adjusted"]
    assert a["adjusted_low"] <= 0.08 <= a["adjusted_high"] and b["adjusted_low"] <= 0.08 <= b["adjusted_high"]
    assert (b["adjusted_high"] - b["adjusted_low"]) > 2 * (a["adjusted_high"] - a["adjusted_low"])
    assert b["adjusted_high"] > 0.3  # a patient whose FPR is 0.05 reads 0.302 -> (0.302 - 0.05) / 0.85 = 0.30


def test_expected_fraction_interval_inverts_the_validation_patients_class_means():
    """Validation patients read 0.8 on IDC patches and 0.1 on the others: a patient whose 1,000 patches
    average 0.31 holds (0.31 - 0.1) / 0.7 = 30% IDC. If their non-IDC mean swings 0.0 / 0.2, so does f."""
    probs = np.full(1000, 0.31)
    sums = (float(probs.sum()), float((probs**2).sum()))
    steady = [[f"p{i}", 100, 0.8, 100, 0.1] for i in range(6)]
    swinging = [[f"p{i}", 100, 0.8, 100, 0.0 if i % 2 else 0.2] for i in range(6)]
    a = fraction_estimates(310, 1000, *sums, None, steady)
    b = fraction_estimates(310, 1000, *sums, None, swinging)
    assert a["expected"] == pytest.approx(0.31) == b["expected"]  # the point is the mean calibrated probability
    assert b["expected_low"] <= b["expected"] <= b["expected_high"]
    assert a["expected_low"] == pytest.approx(0.3, abs=0.01) and a["expected_high"] == pytest.approx(0.3, abs=0.01)
    assert b["expected_low"] == pytest.approx(0.11 / 0.6, abs=0.01)  # (0.31 - 0.2) / (0.8 - 0.2)
    assert b["expected_high"] == pytest.approx(0.31 / 0.8, abs=0.01)  # (0.31 - 0.0) / 0.8
    assert math.isnan(a["adjusted"])  # no error rates (an older model): no adjusted count


def test_class_means_per_patient():
    from idc_infer.quantify import class_mean_probs

    rows = class_mean_probs([0.9, 0.7, 0.2, 0.4], [1, 1, 0, 1], ["a", "a", "a", "b"])
    assert rows == [["a", 2, pytest.approx(0.8), 1, pytest.approx(0.2)], ["b", 1, pytest.approx(0.4), 0, None]]


def test_no_scored_patches_gives_no_fractions():
    est = fraction_estimates(0, 0, 0.0, 0.0, None, None)
    assert all(math.isnan(v) for v in est.values())


def test_expected_interval_is_for_the_true_share_even_where_the_mean_is_biased():
    """Validation non-IDC patches read 0.1 and IDC ones 0.8: a patient with no IDC averages 0.12, which the
    plain mean reports; its interval is for the true share and reaches 0; one with all IDC reaches 1."""
    means = [[f"p{i}", 100, 0.8 + 0.02 * (i % 3), 100, 0.1 + 0.02 * (i % 3)] for i in range(9)]
    for mean, truth in ((0.12, 0.0), (0.82, 1.0), (0.45, 0.5)):
        probs = np.full(500, mean)
        est = fraction_estimates(0, 500, float(probs.sum()), float((probs**2).sum()), None, means)
        assert est["expected"] == pytest.approx(mean)
        assert est["expected_low"] <= truth <= est["expected_high"]


def test_headline_falls_back_when_the_threshold_is_not_the_models():
    from idc_infer.contract import Contract
    from idc_infer.quantify import headline_of

    contract = Contract(
        threshold=0.3, calibration={"method": "platt", "a": 1.0, "b": 0.0}, quantification={"headline": "adjusted"}
    )
    assert headline_of(contract, 0.3) == "adjusted"
    assert headline_of(contract, 0.5) == "expected"  # the adjusted count is not computed at another threshold
    assert headline_of(contract.replace(calibration=None), 0.5) == "counted"


def test_a_patients_summary_row_follows_its_counts_though_it_is_computed_once():
    """The writer thread computes a patient's summary row as it closes, and summary.csv reuses it: a row asked
    for again after more patches (or another threshold) must be the new one, and a reused row the same."""
    from idc_infer.contract import Contract
    from idc_infer.engine import PatientTally

    contract = Contract()
    tally = PatientTally()
    for prob in (0.9, 0.2, 0.7):
        tally.add(prob, int(prob >= 0.5), None)
    first = tally.summary_row("p1", 0.5, "abc", contract)
    first["n_idc"] = -1  # a caller changing its copy changes nothing
    assert tally.summary_row("p1", 0.5, "abc", contract)["n_idc"] == 2
    tally.add(0.8, 1, None)
    again = tally.summary_row("p1", 0.5, "abc", contract)
    assert (again["n_patches"], again["n_idc"], again["mean_prob_idc"]) == (4, 3, pytest.approx(0.65))
    assert tally.summary_row("p1", 0.75, "abc", contract)["threshold"] == 0.75
    tally.slide_note = "slide: 12 tissue tiles"
    assert "12 tissue tiles" in tally.summary_row("p1", 0.5, "abc", contract)["notes"]
    trained_on_p1 = Contract(training_patients=("p1",))  # another contract: its own notes, never the last row's
    assert "training data" in tally.summary_row("p1", 0.5, "abc", trained_on_p1)["notes"]
    assert "training data" not in tally.summary_row("p1", 0.5, "abc", contract)["notes"]
    fresh = PatientTally.from_state(tally.to_state())
    assert fresh.summary_row("p1", 0.5, "abc", contract) == tally.summary_row("p1", 0.5, "abc", contract)
