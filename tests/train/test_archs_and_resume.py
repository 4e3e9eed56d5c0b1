"""Every seed architecture trains end to end; runs resume from checkpoints; tf.distribute works."""

import csv
import json
import subprocess
import sys
import textwrap

import pytest

from ..conftest import require_module  # noqa: E402

require_module("tensorflow")

from idc_train.training import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    from idc_train.synthetic import write_cohort

    root = tmp_path_factory.mktemp("small")
    write_cohort(root, n_patients=4, seed=21, grid=5)
    return root


def _history(run_dir):
    return list(csv.DictReader(open(run_dir / "history.csv")))


@pytest.mark.parametrize(
    "arch,augment,early_stopping", [("simple-cnn", "both", "val-loss"), ("transfer", "seed", "val-auc")]
)
def test_two_epoch_run_of_each_arch(small_cohort, tmp_path, arch, augment, early_stopping):
    meta = train(
        TrainConfig(
            small_cohort,
            tmp_path / arch,
            epochs=2,
            batch_size=16,
            arch=arch,
            patience=5,
            learning_rate=1e-3,
            transfer_weights=None,
            augment=augment,
            early_stopping=early_stopping,
        )
    )
    assert meta["arch"] == arch and meta["epochs_run"] == 2
    assert meta["config"]["augment"] == augment
    history = _history(tmp_path / arch)
    assert "val_idc_loss" in history[0] and float(history[0]["val_idc_loss"]) > 0
    assert (tmp_path / arch / "model.keras").exists()
    assert (tmp_path / arch / "eval-test" / "metrics.json").exists()


def test_resume_continues_from_the_last_epoch(small_cohort, tmp_path):
    run_dir = tmp_path / "run"
    train(TrainConfig(small_cohort, run_dir, epochs=2, batch_size=16, arch="simple-cnn", learning_rate=1e-3))
    assert len(_history(run_dir)) == 2
    meta = train(
        TrainConfig(small_cohort, run_dir, epochs=3, batch_size=16, arch="simple-cnn", learning_rate=1e-3, resume=True)
    )
    assert [int(r["epoch"]) for r in _history(run_dir)] == [0, 1, 2]  # only epoch 3 was trained again
    assert meta["epochs_run"] == 3


def test_no_early_stopping_keeps_the_last_epoch_and_resume_refuses_other_settings(small_cohort, tmp_path):
    from idc_train.training import TrainingDataError

    run_dir = tmp_path / "run"
    meta = train(
        TrainConfig(small_cohort, run_dir, epochs=2, batch_size=16, arch="simple-cnn", learning_rate=1e-3, patience=0)
    )
    assert meta["epochs_run"] == 2 and meta["best_epoch"] == 2  # as the seed: every epoch, the last one kept
    assert meta["early_stopping"] == "off: the last epoch is kept"
    for changed in ({"arch": "cancernet"}, {"split": "random-patch"}, {"seed": 5}):
        config = dict(epochs=3, batch_size=16, arch="simple-cnn", learning_rate=1e-3, patience=0, resume=True)
        config.update(changed)
        with pytest.raises(TrainingDataError, match=f"other settings \\({next(iter(changed))}\\)"):
            train(TrainConfig(small_cohort, run_dir, **config))


def test_resume_accepts_the_same_data_spelt_another_way(small_cohort, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(TrainConfig(small_cohort, run_dir, epochs=1, batch_size=16, arch="simple-cnn", learning_rate=1e-3))
    monkeypatch.chdir(small_cohort.parent)  # now the data dir is given relative to here
    from pathlib import Path

    meta = train(
        TrainConfig(
            Path(small_cohort.name),
            run_dir,
            epochs=2,
            batch_size=16,
            arch="simple-cnn",
            learning_rate=1e-3,
            resume=True,
        )
    )
    assert meta["epochs_run"] == 2


def test_interrupted_evaluation_leaves_no_report_of_an_earlier_model(small_cohort, tmp_path, monkeypatch):
    import idc_train.evaluate

    run_dir = tmp_path / "run"
    train(TrainConfig(small_cohort, run_dir, epochs=1, batch_size=16, arch="simple-cnn", learning_rate=1e-3))
    assert (run_dir / "eval-test" / "predictions.csv").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(idc_train.evaluate, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(small_cohort, run_dir, epochs=1, batch_size=16, arch="simple-cnn", learning_rate=1e-3))
    assert (run_dir / "train_meta.json").exists() and not (run_dir / "eval-test").exists()


def test_mirrored_strategy_over_two_logical_cpus(small_cohort, tmp_path):
    code = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from idc_train.training import TrainConfig, train
        meta = train(TrainConfig({str(small_cohort)!r}, {str(tmp_path / "mirrored")!r}, epochs=2, batch_size=16,
                                 arch="simple-cnn", learning_rate=1e-3, distribute="mirrored"))
        print("REPLICAS", meta["replicas"])
    """)
    env_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    assert "REPLICAS 2" in env_run.stdout
    meta = json.loads((tmp_path / "mirrored" / "train_meta.json").read_text())
    assert meta["metrics"]["val"]["roc_auc"] > 0.5


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_multiworker_with_a_one_worker_cluster(small_cohort, tmp_path):
    """--distribute multiworker as a cluster of one (TF_CONFIG set): the chief trains and writes the run."""
    import os

    tf_config = {"cluster": {"worker": [f"127.0.0.1:{_free_port()}"]}, "task": {"type": "worker", "index": 0}}
    env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run_dir = tmp_path / "multi"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from idc_train.cli import main; main()",
            str(small_cohort),
            "--out",
            str(run_dir),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--arch",
            "simple-cnn",
            "--learning-rate",
            "1e-3",
            "--distribute",
            "multiworker",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((run_dir / "train_meta.json").read_text())
    assert meta["config"]["distribute"] == "multiworker" and meta["replicas"] == 1
    assert (run_dir / "model.keras").exists() and (run_dir / "eval-test" / "metrics.json").exists()


def test_multiworker_without_tf_config_is_a_usage_error(small_cohort, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from idc_train.cli import main

    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = CliRunner().invoke(main, [str(small_cohort), "--out", str(tmp_path / "r"), "--distribute", "multiworker"])
    assert result.exit_code == 2 and "TF_CONFIG" in result.output
    assert not (tmp_path / "r").exists()
