"""The model shipped in models/: a real (not demo) model whose contract says what it is and how good it is."""

import csv
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from idc_infer.engine import score_paths
from idc_infer.metrics import roc_auc
from idc_infer.model import INT8_NAME, default_model_path, load_model

from ..conftest import REPO

REQUIRED_METRICS = ("roc_auc", "balanced_accuracy", "f1", "sensitivity", "specificity")


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped():
    return load_model(default_model_path())  # fp32


def test_shipped_model_is_real_and_documented(shipped):
    contract = shipped.contract
    assert not contract.is_demo
    assert "real patches" in contract.provenance["training_data"]
    for key in REQUIRED_METRICS:
        assert 0.0 <= contract.provenance["metrics"][key] <= 1.0
    split = contract.provenance["split_patients"]
    assert not set(split["train"]) & set(split["test"]) and not set(split["train"]) & set(split["val"])
    assert set(contract.training_patients) == set(split["train"])
    assert 0.0 < contract.threshold < 1.0
    assert contract.calibration["method"] == "platt" and contract.calibration["a"] > 0
    rates = contract.quantification["error_rates"]
    assert rates["tp"] + rates["fn"] > 100 and rates["tn"] + rates["fp"] > 100
    assert contract.quantification["headline"] in ("counted", "adjusted", "expected")


def test_shipped_model_reproduces_its_validation_metrics_on_the_real_patches(shipped, real_data):
    """The uniform-sample validation patches give the ROC-AUC the contract reports (calibration is monotone)."""
    val_patients = set(shipped.contract.provenance["split_patients"]["val"])
    rows = [
        r
        for r in csv.DictReader(open(real_data / "manifest.csv"))
        if r["patient_id"] in val_patients and r["uniform_sample"] == "1"
    ]
    assert {r["label"] for r in rows} == {"0", "1"}
    labels = {real_data / r["path"]: int(r["label"]) for r in rows}
    with ThreadPoolExecutor(2) as pool:
        scored = list(score_paths(shipped, sorted(labels), pool, batch_size=128))
    assert all(s.prob_idc is not None for s in scored)
    auc = roc_auc([labels[s.path] for s in scored], [s.prob_idc for s in scored])
    reported = shipped.contract.provenance["val_evaluation"]["uniform_sample"]
    assert reported["n"] == len(scored)
    assert auc == pytest.approx(reported["roc_auc"], abs=1e-3)
    assert auc > reported["baseline_darkness_roc_auc"]  # better than brightness alone


def test_real_whole_patient_gets_corrected_fractions_and_training_patients_a_note(shipped, real_data, tmp_path):
    from idc_infer.cli import main

    val_patient = "9022"  # whole patient of the validation fold (517 patches)
    train_patient = sorted(shipped.contract.training_patients)[0]
    out = tmp_path / "reports"
    result = CliRunner().invoke(
        main,
        [
            str(real_data / val_patient),
            str(real_data / train_patient),
            "--model",
            str(shipped.path),
            "--out",
            str(out),
            "--no-review",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {r["patient_id"]: r for r in csv.DictReader(open(out / "summary.csv", newline=""))}
    val = rows[val_patient]
    for name in ("idc_fraction", "idc_fraction_adjusted", "idc_fraction_expected"):
        point, low, high = (float(val[name + s]) for s in ("", "_ci95_low", "_ci95_high"))
        assert 0.0 <= low <= high <= 1.0 and low <= point + 1e-9, name
    assert "training data" not in val["notes"] and "validation patients" in val["notes"]
    assert "was in the model's training data" in rows[train_patient]["notes"]


def test_default_model_is_the_fp32_file():
    """Never a CPU flag: idc-infer --precision auto times both files (tests/infer/test_precision.py)."""
    assert default_model_path().name == "cancernet-fp32.onnx"


def test_shipped_int8_passed_its_gate_or_the_card_says_why(shipped):
    models_dir = shipped.path.parent
    card = (models_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    if not (models_dir / INT8_NAME).exists():
        assert "int8 accuracy gate: FAILED" in card or "int8: requested but could not run" in card
        return
    int8 = load_model(models_dir / INT8_NAME)
    assert int8.contract.provenance["training_data"] == shipped.contract.provenance["training_data"]
    assert int8.contract.provenance["quantization_gate"] == "passed"
    assert int8.contract.calibration != shipped.contract.calibration  # its own fit on its own outputs


def test_shipped_report_and_card_describe_the_shipped_files(shipped):
    """export-report.json and MODEL_CARD.md beside the models say what the files themselves say."""
    from dataclasses import asdict

    models_dir = shipped.path.parent
    report = json.loads((models_dir / "export-report.json").read_text(encoding="utf-8"))
    as_json = lambda contract: json.loads(json.dumps(asdict(contract)))  # noqa: E731 (tuples -> lists)
    assert as_json(shipped.contract) == report["contract"]
    assert report["files"]["fp32"]["sha256"] == shipped.sha256
    if (models_dir / INT8_NAME).exists():
        int8 = load_model(models_dir / INT8_NAME)
        assert as_json(int8.contract) == report["quantization"]["contract"]
        assert report["files"]["int8"]["sha256"] == int8.sha256
    card = (models_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert shipped.sha256[:12] in card and "research use only" in card.lower()
    assert f"| roc_auc | {shipped.contract.provenance['metrics']['roc_auc']:.4f} |" in card
    assert "for scale only" in card and "Headline estimator" in card
    report_text = (models_dir / "export-report.json").read_text(encoding="utf-8")
    for text in (card, report_text):  # they ship with the package: no path of the machine that built them
        assert str(REPO.parent) not in text and "/shared/data/" not in text


def test_a_task_calibrated_at_once_gives_each_patch_its_own_batch_s_probability(shipped, real_data):
    """The engine runs a task's patches through the graph 16 at a time and calibrates them all at once: each
    prob_idc must be what predict_prob_idc gives for the patch's own batch, and for the patch alone, bit for bit."""
    import numpy as np

    from idc_infer.preprocess import decode_file

    rows = [r for r in csv.DictReader(open(real_data / "manifest.csv")) if r["uniform_sample"] == "1"][:150]
    paths = [real_data / r["path"] for r in rows]
    tensors = [d.ok_tensor() for d in (decode_file(p, shipped.contract) for p in paths) if d.status == "ok"]
    with ThreadPoolExecutor(2) as pool:
        scored = [s.prob_idc for s in score_paths(shipped, paths, pool, batch_size=128) if s.prob_idc is not None]
    by_batch = np.concatenate(
        [shipped.predict_prob_idc(np.stack(tensors[i : i + 16])) for i in range(0, len(tensors), 16)]
    )
    alone = np.concatenate([shipped.predict_prob_idc(t[None]) for t in tensors[:20]])
    assert len(scored) == len(tensors) > 100
    assert scored == by_batch.tolist()
    assert scored[:20] == alone.tolist()
