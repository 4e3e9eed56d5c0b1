"""idc-eval on synthetic patients: Keras and ONNX judged by the same code, real plots."""
import json

import cv2
import pytest
from click.testing import CliRunner

pytest.importorskip("tensorflow")

from idc_train.evaluate import format_report  # noqa: E402


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
    args = [str(demo_onnx), _meta(demo_run)["data_dir"], "--out", str(out), "--split", str(demo_run / "split.csv"),
            "--history", str(demo_run / "history.csv")]
    result = CliRunner().invoke(eval_main, args)
    assert result.exit_code == 0, result.output
    image = cv2.imread(str(out / "curves.png"))
    assert image is not None and image.std() > 5


def test_published_results_printed_for_janowczyk_test_fold():
    metrics = {"n": 10, "n_idc": 4, "threshold": 0.5, "tp": 3, "fp": 1, "tn": 5, "fn": 1, "accuracy": 0.8,
               "sensitivity": 0.75, "specificity": 5 / 6, "balanced_accuracy": 0.79, "precision": 0.75, "f1": 0.75,
               "roc_auc": 0.9}
    text = format_report(metrics, 0.7, [], "m.onnx", "janowczyk2016", "test", 0)
    assert "0.7648" in text and "0.8420" in text and "Cruz-Roa" in text
    assert "0.7648" not in format_report(metrics, 0.7, [], "m.onnx", "patient", "test", 0)


def test_janowczyk_split_ships_with_the_package():
    from idc_train.data import published_split

    assignment = published_split("janowczyk2016")
    values = list(assignment.values())
    assert (values.count("train"), values.count("val"), values.count("test")) == (84, 29, 49)
    assert assignment["8865"] == "train" and assignment["8867"] == "val" and "8863" not in assignment
