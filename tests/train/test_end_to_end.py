"""Synthetic cohort -> idc-train -> idc-export -> idc-infer on patients the model never saw."""

import csv

import pytest
from click.testing import CliRunner

from ..conftest import require_module  # noqa: E402

require_module("tf2onnx")

from idc_infer.metrics import roc_auc  # noqa: E402

pytestmark = pytest.mark.tf


def test_train_export_infer_beats_chance_on_unseen_patients(demo_onnx, demo_run, tmp_path):
    from idc_infer.cli import main
    from idc_train.synthetic import write_cohort

    unseen = tmp_path / "unseen"
    write_cohort(unseen, n_patients=3, seed=777, grid=6, first_id=80001)
    result = CliRunner().invoke(main, [str(unseen), "--model", str(demo_onnx), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    labels, probs = [], []
    for pid in ("80001", "80002", "80003"):
        for row in csv.DictReader(open(tmp_path / "out" / f"{pid}.csv")):
            labels.append(int(row["label"]))
            probs.append(float(row["prob_idc"]))
    assert len(labels) == 108
    assert roc_auc(labels, probs) > 0.85
