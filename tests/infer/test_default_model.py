"""The model shipped in models/: a real (not demo) model whose contract says what it is."""
import csv
from concurrent.futures import ThreadPoolExecutor

import pytest

from idc_infer.engine import score_paths
from idc_infer.metrics import roc_auc
from idc_infer.model import default_model_path, load_model

REQUIRED_METRICS = ("roc_auc", "balanced_accuracy", "f1", "sensitivity", "specificity")


@pytest.fixture(scope="module")
def shipped():
    return load_model(default_model_path(set()))  # fp32


def test_shipped_model_is_real_and_documented(shipped):
    contract = shipped.contract
    assert not contract.is_demo
    assert "real patches" in contract.provenance["training_data"]
    for key in REQUIRED_METRICS:
        assert 0.0 <= contract.provenance["metrics"][key] <= 1.0
    assert contract.provenance["metrics_on"] == "test patients"
    split = contract.provenance["split_patients"]
    assert not set(split["train"]) & set(split["test"]) and not set(split["train"]) & set(split["val"])
    assert 0.0 < contract.threshold < 1.0


def test_shipped_model_separates_real_held_out_patients(shipped, real_data):
    test_patients = set(shipped.contract.provenance["split_patients"]["test"])
    rows = [r for r in csv.DictReader(open(real_data / "manifest.csv")) if r["patient_id"] in test_patients]
    assert {r["label"] for r in rows} == {"0", "1"}
    labels = {real_data / r["path"]: int(r["label"]) for r in rows}
    with ThreadPoolExecutor(2) as pool:
        scored = list(score_paths(shipped, sorted(labels), pool, batch_size=128))
    assert all(s.prob_idc is not None for s in scored)
    auc = roc_auc([labels[s.path] for s in scored], [s.prob_idc for s in scored])
    assert auc == pytest.approx(shipped.contract.provenance["metrics"]["roc_auc"], abs=0.01)
    assert auc > 0.7


def test_default_precision_follows_the_cpu():
    assert default_model_path({"avx2", "avx512_vnni"}).name == "cancernet-int8.onnx"
    assert default_model_path({"avx2", "fma"}).name == "cancernet-fp32.onnx"
    assert default_model_path(set()).name == "cancernet-fp32.onnx"


def test_shipped_int8_passed_its_gate_and_keeps_the_contract(shipped):
    int8 = load_model(default_model_path({"avx512_vnni"}))
    assert int8.contract.threshold == shipped.contract.threshold
    assert int8.contract.provenance["training_data"] == shipped.contract.provenance["training_data"]
    assert int8.contract.provenance["quantization_gate"] == "passed"


def test_shipped_report_and_card_describe_the_shipped_files(shipped):
    """export-report.json and MODEL_CARD.md beside the models say what the files themselves say."""
    import json
    from dataclasses import asdict

    models_dir = shipped.path.parent
    report = json.loads((models_dir / "export-report.json").read_text(encoding="utf-8"))
    int8 = load_model(models_dir / "cancernet-int8.onnx")
    as_json = lambda contract: json.loads(json.dumps(asdict(contract)))  # noqa: E731 (tuples -> lists)
    assert as_json(shipped.contract) == report["contract"]
    assert as_json(int8.contract) == report["quantization"]["contract"]
    assert report["files"]["fp32"]["sha256"] == shipped.sha256 and report["files"]["int8"]["sha256"] == int8.sha256
    card = (models_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert shipped.sha256[:12] in card and "research use only" in card.lower()
    assert f"| roc_auc | {shipped.contract.provenance['metrics']['roc_auc']:.4f} |" in card
