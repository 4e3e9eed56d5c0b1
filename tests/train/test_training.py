"""Training end to end on synthetic patients, and the collapsed-model check."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ..conftest import require_module  # noqa: E402

require_module("tensorflow")

from idc_train.training import CollapsedModelError, check_not_collapsed  # noqa: E402

pytestmark = pytest.mark.tf


def test_run_dir_holds_model_split_and_metadata(demo_run):
    assert (demo_run / "model.keras").stat().st_size > 100_000
    meta = json.loads((demo_run / "train_meta.json").read_text())
    assert meta["demo"] is True and "SYNTHETIC" in meta["training_data"]
    split = list(csv.DictReader(open(demo_run / "split.csv")))
    assert {r["set"] for r in split} == {"train", "val", "test"}
    assert meta["metrics"]["val"]["roc_auc"] > 0.8
    assert 0.0 <= meta["threshold"] <= 1.0
    history = list(csv.DictReader(open(demo_run / "history.csv")))
    assert len(history) == meta["epochs_run"] and "val_roc_auc" in history[0]


def test_constant_output_is_called_collapsed():
    with pytest.raises(CollapsedModelError, match="collapsed"):
        check_not_collapsed(np.full(100, 0.42) + np.random.default_rng(0).normal(0, 1e-6, 100), "val")
    check_not_collapsed(np.linspace(0, 1, 100), "val")


def test_cli_refuses_single_class_data(tmp_path):
    from idc_train.cli import main
    from idc_train.synthetic import write_patient

    for pid in ("1", "2", "3"):
        write_patient(tmp_path / "data", pid, grid=3, idc_radius=0.0)
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 2
    assert "both classes" in result.output


def test_cancernet_learning_rate_decays_per_step_as_the_seeds_adagrad():
    """Keras 2's Adagrad(lr=1e-2, decay=1e-2/40) gave lr / (1 + 2.5e-4 * step)."""
    from idc_train.architectures import make_optimizer

    schedule = make_optimizer("cancernet", 1e-2, 40)._learning_rate  # .learning_rate is the current value
    assert float(schedule(0)) == pytest.approx(1e-2)
    assert float(schedule(4000)) == pytest.approx(1e-2 / 2)
    assert float(schedule(240_000)) == pytest.approx(1e-2 / 61)  # 40 epochs of the full set at batch 32
