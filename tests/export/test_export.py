"""Export: the contract is in the file and read back by infer; the parity gate bites."""

import json

import numpy as np
import pytest

from idc_infer import __version__

from ..conftest import require_module  # noqa: E402

require_module("tf2onnx")

from idc_export.convert import ParityError, check_parity, load_parity_inputs  # noqa: E402
from idc_infer.contract import Contract  # noqa: E402
from idc_infer.model import load_model  # noqa: E402

from ..conftest import SAMPLE_PATIENT  # noqa: E402

pytestmark = pytest.mark.tf


def test_contract_is_read_back_by_infer(demo_onnx, demo_run):
    model = load_model(demo_onnx)
    meta = json.loads((demo_run / "train_meta.json").read_text())
    assert model.contract.is_demo
    assert model.contract.threshold == pytest.approx(meta["threshold"])
    assert model.contract.provenance["source_model_sha256"]
    assert model.contract.provenance["metrics"]["roc_auc"] == pytest.approx(meta["metrics"]["test"]["roc_auc"])
    assert (model.contract.input_height_px, model.contract.channel_order) == (48, "RGB")
    export = model.contract.provenance["export"]
    assert export["precision"] == "fp32" and export["tf2onnx"] and export["tensorflow"] and export["opset"] == 17
    assert export["parity"]["max_abs_diff"] <= export["parity"]["tolerance"] == 1e-4
    # CancerNet's six post-ReLU batch norms run as depthwise convs, three of them after the pooling
    assert export["graph_rewrites"] == {"batchnorm_as_depthwise_conv": 6, "scale_after_maxpool": 3}
    assert model.contract.provenance["code_version"].startswith(__version__)


def test_opset_is_a_choice_recorded_in_the_contract(demo_run, tmp_path):
    import onnx
    from click.testing import CliRunner

    from idc_export.cli import main

    out = tmp_path / "op13.onnx"
    result = CliRunner().invoke(
        main, [str(demo_run / "model.keras"), "--out", str(out), "--opset", "13", "--parity-data", str(SAMPLE_PATIENT)]
    )
    assert result.exit_code == 0, result.output
    assert load_model(out).contract.provenance["export"]["opset"] == 13
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}[""] == 13
    too_new = CliRunner().invoke(
        main, [str(demo_run / "model.keras"), "--out", str(tmp_path / "x.onnx"), "--opset", "19"]
    )
    assert too_new.exit_code == 2 and "19" in too_new.output and not (tmp_path / "x.onnx").exists()


def test_exported_model_outputs_vary(demo_onnx):
    model = load_model(demo_onnx)
    inputs = load_parity_inputs(model.contract, [SAMPLE_PATIENT], n_random=0)
    assert np.std(model.predict_prob_idc(inputs)) > 1e-3


def test_parity_gate_catches_changed_weights(demo_run, demo_onnx):
    import keras

    keras_model = keras.models.load_model(demo_run / "model.keras", compile=False)
    inputs = load_parity_inputs(Contract(), [SAMPLE_PATIENT], n_random=16)
    report = check_parity(keras_model, demo_onnx.read_bytes(), inputs)
    assert report.max_abs_diff <= 1e-4
    last = keras_model.layers[-2]
    kernel, bias = last.get_weights()
    last.set_weights([kernel * 1.5, bias + 0.3])
    with pytest.raises(ParityError, match="not faithful"):
        check_parity(keras_model, demo_onnx.read_bytes(), inputs)


def test_parity_gate_catches_broken_preprocessing(demo_run, demo_onnx):
    import keras

    keras_model = keras.models.load_model(demo_run / "model.keras", compile=False)
    inputs = load_parity_inputs(Contract(), [SAMPLE_PATIENT], n_random=0)

    class SwappedChannels:  # a Keras side that fed BGR where the file says RGB
        def predict(self, x, **kwargs):
            return keras_model.predict(x[..., ::-1], **kwargs)

    with pytest.raises(ParityError):
        check_parity(SwappedChannels(), demo_onnx.read_bytes(), inputs)


def test_export_starts_from_the_contract_training_recorded(demo_run, tmp_path, caplog):
    """The exported file's preprocessing is what train_meta.json says the model trained with, not defaults."""
    import shutil

    from idc_export.convert import export_fp32

    meta = json.loads((demo_run / "train_meta.json").read_text())
    trained = meta["contract"]
    assert trained["positive_class_index"] == 1 and trained["undersized_policy"] == "resize"
    assert trained["threshold"] == pytest.approx(meta["threshold"])
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    meta["contract"] = trained | {"undersized_policy": "pad"}  # as a run trained under that policy records it
    (run / "train_meta.json").write_text(json.dumps(meta))
    export_fp32(run / "model.keras", tmp_path / "m.onnx", [SAMPLE_PATIENT])
    contract = load_model(tmp_path / "m.onnx").contract
    assert contract.undersized_policy == "pad" and contract.threshold == pytest.approx(meta["threshold"])
    del meta["contract"]  # a run of idc 0.1: the defaults, said out loud
    (run / "train_meta.json").write_text(json.dumps(meta))
    export_fp32(run / "model.keras", tmp_path / "old.onnx", [SAMPLE_PATIENT])
    assert load_model(tmp_path / "old.onnx").contract.undersized_policy == "resize"
    assert "records no contract" in caplog.text
