"""idc-eval on synthetic patients: Keras and ONNX judged by the same code, real plots."""

import json
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from ..conftest import SAMPLE_PATIENT, require_module  # noqa: E402

require_module("tensorflow")

from idc_train.evaluate import format_report  # noqa: E402

pytestmark = pytest.mark.tf


def _meta(run_dir):
    return json.loads((run_dir / "train_meta.json").read_text())


def test_train_ends_with_an_evaluation_of_the_test_patients(demo_run):
    report = (demo_run / "eval-test" / "report.txt").read_text()
    metrics = json.loads((demo_run / "eval-test" / "metrics.json").read_text())
    assert "confusion matrix" in report and "research use only" in report
    predictions = (demo_run / "eval-test" / "predictions.csv").read_text().splitlines()
    assert len(predictions) == metrics["metrics"]["n"] + 1
    assert {p["patient_id"] for p in metrics["per_patient"]} == set(_meta(demo_run)["split"]["test"])
    for name in ("roc.png", "confusion.png", "examples.png", "curves.png"):
        image = cv2.imread(str(demo_run / "eval-test" / name))
        assert image is not None and image.shape[0] > 100 and image.std() > 5, name


def test_keras_and_onnx_give_the_same_metrics(demo_run, demo_onnx, tmp_path):
    from idc_train.cli import eval_main

    data_dir = _meta(demo_run)["data_dir"]
    split = str(demo_run / "split.csv")
    results = {}
    for name, model in (("keras", demo_run / "model.keras"), ("onnx", demo_onnx)):
        out = tmp_path / name
        result = CliRunner().invoke(eval_main, [str(model), data_dir, "--out", str(out), "--split", split])
        assert result.exit_code == 0, result.output
        results[name] = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("tp", "fp", "tn", "fn"):
        assert results["keras"][key] == results["onnx"][key]
    assert results["keras"]["roc_auc"] == pytest.approx(results["onnx"]["roc_auc"], abs=1e-4)
    assert not (tmp_path / "onnx" / "curves.png").exists()  # the ONNX file lives away from its run


def test_eval_draws_curves_from_a_given_history(demo_run, demo_onnx, tmp_path):
    from idc_train.cli import eval_main

    out = tmp_path / "with-history"
    args = [
        str(demo_onnx),
        _meta(demo_run)["data_dir"],
        "--out",
        str(out),
        "--split",
        str(demo_run / "split.csv"),
        "--history",
        str(demo_run / "history.csv"),
    ]
    result = CliRunner().invoke(eval_main, args)
    assert result.exit_code == 0, result.output
    image = cv2.imread(str(out / "curves.png"))
    assert image is not None and image.std() > 5


def _scores(tmp_path):
    """Three patients: A (whole, 100 patches, 20% IDC, 10 of them a uniform sample), B and C (per-class picks)."""
    import numpy as np

    from idc_train.evaluate import Scores

    rng = np.random.default_rng(1)
    scores = Scores()
    for pid, n, n_idc in (("A", 100, 20), ("B", 40, 30), ("C", 40, 10)):
        for k in range(n):
            label = int(k < n_idc)
            scores.paths.append(str(tmp_path / pid / f"{k}.png"))
            scores.patient_ids.append(pid)
            scores.labels.append(label)
            scores.probs.append(float(np.clip(0.3 + 0.4 * label + rng.normal(0, 0.25), 0, 1)))
            scores.darkness.append(float(rng.uniform()))
    return scores


def _design(tmp_path, scores):
    from idc_train.data import read_sample_design

    uniform = [p for p, pid in zip(scores.paths, scores.patient_ids) if pid == "A"][::10] + [
        p for p, pid in zip(scores.paths, scores.patient_ids) if pid != "A"
    ][::8]
    rows = ["path,patient_id,uniform_sample"] + [
        f"{Path(p).relative_to(tmp_path).as_posix()},{pid},{int(p in uniform)}"
        for p, pid in zip(scores.paths, scores.patient_ids)
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "patients.csv").write_text("patient_id,whole_patient\nA,yes\nB,no\nC,no\n")
    return read_sample_design(tmp_path), uniform


def test_pooled_metrics_on_the_uniform_sample_with_patient_intervals(tmp_path):
    from idc_infer.metrics import classification_metrics
    from idc_train.evaluate import honest_metrics

    scores = _scores(tmp_path)
    design, uniform = _design(tmp_path, scores)
    honest = honest_metrics(scores, 0.5, design)
    sample = honest["uniform_sample"]
    pick = [p in uniform for p in scores.paths]
    expected = classification_metrics(
        [l for l, k in zip(scores.labels, pick) if k], [p for p, k in zip(scores.probs, pick) if k], 0.5
    )
    assert sample["n"] == len(uniform) == expected["n"] and sample["roc_auc"] == expected["roc_auc"]
    assert sample["n_patients"] == 3 and honest["all_scored_patches"]["n"] == 180
    for key in ("roc_auc", "balanced_accuracy", "f1", "baseline_darkness_roc_auc"):
        low, high = sample["interval_95"][key]
        assert low <= sample[key] <= high, key
    whole = honest["whole_patients"]  # only A's true fraction is the slide's
    assert whole["n_patients"] == 1 and whole["patients"][0]["patient_id"] == "A"
    assert whole["fraction_mae"] == pytest.approx(abs(whole["patients"][0]["predicted_idc_fraction"] - 0.2))


def test_report_shows_published_results_as_scale_unless_on_their_patients(tmp_path):
    from idc_train.evaluate import honest_metrics

    scores = _scores(tmp_path)
    design, _ = _design(tmp_path, scores)
    honest = honest_metrics(scores, 0.5, design)
    metrics = honest["all_scored_patches"]
    other = format_report(metrics, 0.7, [], "m.onnx", "janowczyk2016", "val", 0, honest, same_as_published=False)
    assert "0.7648" in other and "0.8420" in other and "Cruz-Roa" in other
    assert "for scale only, not a comparison" in other and "uniform sample of each patient (unbiased)" in other
    same = format_report(metrics, 0.7, [], "m.onnx", "janowczyk2016", "test", 0, honest, same_as_published=True)
    assert "0.7648" in same and "for scale only" not in same


def test_janowczyk_split_ships_with_the_package():
    from idc_train.data import published_split

    assignment = published_split("janowczyk2016")
    values = list(assignment.values())
    assert (values.count("train"), values.count("val"), values.count("test")) == (84, 29, 49)
    assert assignment["8865"] == "train" and assignment["8867"] == "val" and "8863" not in assignment


def test_a_keras_model_is_evaluated_through_the_contract_it_trained_with(demo_run, tmp_path):
    """idc-eval (and train's own validation evaluation) read the contract train_meta.json records, not defaults."""
    import shutil

    from idc_infer.contract import Contract
    from idc_train.evaluate import load_scorer

    meta = json.loads((demo_run / "train_meta.json").read_text())
    assert load_scorer(demo_run / "model.keras").contract == Contract.from_json(json.dumps(meta["contract"]))
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "train_meta.json").write_text(
        json.dumps(meta | {"contract": meta["contract"] | {"undersized_policy": "pad"}})
    )
    assert load_scorer(run / "model.keras").contract.undersized_policy == "pad"


def test_idc_eval_with_a_damaged_training_record_is_a_usage_error(demo_run, tmp_path):
    import shutil

    from idc_train.cli import eval_main

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "train_meta.json").write_text("{not json")
    result = CliRunner().invoke(
        eval_main, [str(run / "model.keras"), str(SAMPLE_PATIENT.parent), "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 2 and "train_meta.json cannot be read" in result.output


def test_crossval_resume_with_a_damaged_folds_file_is_a_usage_error(tmp_path):
    from idc_train.cli import crossval_main
    from idc_train.synthetic import write_cohort

    data = tmp_path / "data"
    write_cohort(data, n_patients=3, seed=1, grid=3)
    out = tmp_path / "cv"
    out.mkdir()
    (out / "folds.csv").write_text("patient_id,fold\n90001,x\n", encoding="utf-8")
    result = CliRunner().invoke(crossval_main, [str(data), "--out", str(out), "--folds", "3", "--resume"])
    assert result.exit_code == 2 and "folds.csv is not a folds file" in result.output, result.output
