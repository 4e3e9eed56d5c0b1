"""Export: the contract is in the file and read back by infer; the parity gate bites."""
import json

import numpy as np
import pytest

pytest.importorskip("tf2onnx")

from idc_export.convert import ParityError, check_parity, load_parity_inputs  # noqa: E402
from idc_infer.contract import Contract  # noqa: E402
from idc_infer.model import load_model  # noqa: E402

from ..conftest import SAMPLE_PATIENT  # noqa: E402


def test_contract_is_read_back_by_infer(demo_onnx, demo_run):
    model = load_model(demo_onnx)
    meta = json.loads((demo_run / "train_meta.json").read_text())
    assert model.contract.is_demo
    assert model.contract.threshold == pytest.approx(meta["threshold"])
    assert model.contract.provenance["source_model_sha256"]
    assert model.contract.provenance["metrics"]["roc_auc"] == pytest.approx(meta["metrics"]["test"]["roc_auc"])
    assert (model.contract.input_height_px, model.contract.channel_order) == (48, "RGB")


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
