"""A model must output class probabilities: logits or NaN graphs are refused at load, and a
non-finite output on one patch makes that patch's row model_error, never ok."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ..conftest import require_module  # noqa: E402

onnx = require_module("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from idc_infer.contract import CONTRACT_KEY, Contract  # noqa: E402
from idc_infer.model import ModelError, load_model  # noqa: E402


def _tiny_model(path, ending: str, provenance=None):
    """NHWC 48x48x3 -> flatten -> MatMul (2 outputs) -> softmax | logits | NaN."""
    weights = np.random.default_rng(0).normal(0, 0.01, (48 * 48 * 3, 2)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    initializers = [numpy_helper.from_array(weights, "w")]
    if ending == "softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], axis=1))
    elif ending == "logits":
        nodes.append(helper.make_node("Mul", ["logits", "k"], ["prob"]))
        initializers.append(numpy_helper.from_array(np.array(50.0, np.float32), "k"))
    else:  # nan: softmax * (0 / 0)
        nodes += [
            helper.make_node("Softmax", ["logits"], ["soft"], axis=1),
            helper.make_node("Div", ["zero", "zero"], ["nan"]),
            helper.make_node("Mul", ["soft", "nan"], ["prob"]),
        ]
        initializers.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 48, 48, 3])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [None, 2])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = (
        CONTRACT_KEY,
        Contract(provenance={"demo": True} if provenance is None else provenance).to_json(),
    )
    onnx.save(model, str(path))
    return path


def test_a_probability_model_loads(tmp_path):
    model = load_model(_tiny_model(tmp_path / "ok.onnx", "softmax"))
    assert model.contract.calibration is None


@pytest.mark.parametrize("ending,message", [("logits", "does not output class probabilities"), ("nan", "non-finite")])
def test_logits_or_nan_model_is_refused_naming_the_file(tmp_path, ending, message):
    path = _tiny_model(tmp_path / f"{ending}.onnx", ending)
    with pytest.raises(ModelError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_logits_model_is_a_usage_error_in_idc_infer(tmp_path, shared_sample):
    from idc_infer.cli import main

    path = _tiny_model(tmp_path / "logits.onnx", "logits")
    result = CliRunner().invoke(main, [str(shared_sample), "--model", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "logits.onnx" in result.output and "probabilities" in result.output


def test_a_non_finite_output_makes_the_row_model_error(tmp_path, shared_sample, monkeypatch):
    from idc_infer.cli import main
    from idc_infer.model import LoadedModel

    real = LoadedModel.raw_prob_idc

    def first_patch_nan(self, batch):  # the graph itself gives NaN for one patch
        probs = real(self, batch)
        probs[0] = np.nan
        return probs

    monkeypatch.setattr(LoadedModel, "raw_prob_idc", first_patch_nan)
    path = _tiny_model(tmp_path / "ok.onnx", "softmax")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(shared_sample), "--model", str(path), "--out", str(out), "--no-review"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "10253.csv", newline="")))
    bad = [r for r in rows if r["status"] == "model_error"]
    assert len(bad) == 1 and bad[0]["prob_idc"] == "" and "non-finite" in bad[0]["message"]
    assert all(r["prob_idc"] != "" for r in rows if r["status"] == "ok")
    summary = next(csv.DictReader(open(out / "summary.csv", newline="")))
    assert int(summary["n_failed"]) == 1 and int(summary["n_scored"]) == len(rows) - 1


def test_a_contract_without_provenance_is_announced_as_unverified_not_synthetic(tmp_path, shared_sample):
    from idc_infer.cli import main

    path = _tiny_model(tmp_path / "bare.onnx", "softmax", provenance={})
    result = CliRunner().invoke(main, [str(shared_sample), "--model", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "UNVERIFIED MODEL" in result.output and "synthetic" not in result.output
    html = (tmp_path / "o" / "report.html").read_text(encoding="utf-8")  # the report says the same
    assert "UNVERIFIED MODEL" in html and "(UNVERIFIED)" in html and "synthetic" not in html
    run = json.loads((tmp_path / "o" / "run.json").read_text(encoding="utf-8"))
    assert run["model"]["demo_warning"].startswith("UNVERIFIED MODEL")


def test_an_export_without_its_training_record_is_unverified_not_synthetic():
    """demo=True with 'unknown' training data (idc-export without train_meta.json) claims nothing about it."""
    from idc_infer.contract import Contract

    unknown = Contract(provenance={"demo": True, "training_data": "unknown (no train_meta.json next to the model)"})
    synthetic = Contract(provenance={"demo": True, "training_data": "SYNTHETIC patches (demo) from d: 6 patients"})
    assert unknown.demo_warning.startswith("UNVERIFIED") and synthetic.demo_warning.startswith("DEMO")
    assert Contract(provenance={"demo": False}).demo_warning is None
