"""idc-crossval end to end on a tiny synthetic cohort, and --resume after an interruption."""

import json

import pytest
from click.testing import CliRunner

from ..conftest import require_module  # noqa: E402

require_module("tensorflow")

from idc_train.cli import crossval_main  # noqa: E402

pytestmark = pytest.mark.tf


def _cv(cohort, out, *extra):
    args = [
        str(cohort),
        "--out",
        str(out),
        "--folds",
        "3",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--seed",
        "2",
        *extra,
    ]
    return CliRunner().invoke(crossval_main, args)


def test_crossval_pools_every_patient_once_and_resumes_only_what_is_missing(synthetic_cohort, tmp_path):
    out = tmp_path / "cv"
    first = _cv(synthetic_cohort, out)
    assert first.exit_code == 0, first.output
    assert "3-fold patient CV, pooled out-of-fold" in first.output
    result = json.loads((out / "crossval.json").read_text())
    tested = [
        p
        for fold in result["folds"]
        for p in json.loads((out / f"fold{fold['fold']}" / "run" / "train_meta.json").read_text())["split"]["test"]
    ]
    assert sorted(tested) == sorted(
        p.name for p in synthetic_cohort.iterdir() if p.is_dir()
    )  # each patient tested once
    n_patches = sum(1 for _ in synthetic_cohort.rglob("*.png"))
    assert result["pooled_out_of_fold"]["n"] == n_patches
    assert 0.0 <= result["pooled_out_of_fold"]["baseline_darkness_roc_auc"] <= 1.0
    assert "darkness baseline on the same patches" in first.output

    # Simulate a stop during the last fold: its training record and evaluation are gone.
    kept = (out / "fold0" / "run" / "model.keras").stat().st_mtime_ns
    (out / "fold2" / "run" / "train_meta.json").unlink()
    for f in (out / "fold2" / "run" / "eval-test").iterdir():
        f.unlink()
    (out / "crossval.json").unlink()
    resumed = _cv(synthetic_cohort, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "fold0" / "run" / "model.keras").stat().st_mtime_ns == kept  # finished folds are not retrained
    again = json.loads((out / "crossval.json").read_text())
    assert again["pooled_out_of_fold"]["n"] == n_patches
    assert [f["threshold"] for f in again["folds"][:2]] == [f["threshold"] for f in result["folds"][:2]]

    # Resuming with another recipe would pool incomparable folds: a usage error naming what changed.
    other = _cv(synthetic_cohort, out, "--resume", "--patience", "3")
    assert other.exit_code == 2 and "different recipe (patience)" in other.output


def test_resume_without_a_previous_crossval_is_a_usage_error(synthetic_cohort, tmp_path):
    result = _cv(synthetic_cohort, tmp_path / "empty", "--resume")
    assert result.exit_code == 2 and "no cross-validation to resume" in result.output
