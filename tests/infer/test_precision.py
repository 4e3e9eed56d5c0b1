"""idc-infer --precision: the shipped file is chosen by timing on this machine, cached, and recorded."""

import json

import pytest
from click.testing import CliRunner

from idc_infer import precision
from idc_infer.cli import main
from idc_infer.model import default_model_path, load_model

from ..conftest import SAMPLE_PATIENT


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """Two distinct model files (the shipped fp32 one and a copy with one byte of metadata changed)."""
    import onnx

    monkeypatch.setenv("IDC_CACHE_DIR", str(tmp_path / "cache"))
    fp32 = default_model_path()
    other = onnx.load(str(fp32))
    other.producer_version = other.producer_version + "-copy"
    int8 = tmp_path / "cancernet-int8.onnx"
    onnx.save(other, str(int8))
    return fp32, int8


def _fake(rates):
    calls = []

    def measure(models, batch):
        calls.append(sorted(models))
        return rates

    return measure, calls


def test_auto_takes_int8_only_when_it_is_clearly_faster_and_caches_it(pair):
    fp32, int8 = pair
    measure, calls = _fake({"fp32": 1000.0, "int8": 1300.0})
    model, record = precision.choose(fp32, int8, 2, load_model, measure)
    assert (
        model.path == int8
        and record["chosen"] == "int8"
        and record["patches_per_s"] == {"fp32": 1000.0, "int8": 1300.0}
    )
    assert not record["cached"] and calls == [["fp32", "int8"]]

    def never(models, batch):
        raise AssertionError("the cached choice must be used")

    again, cached = precision.choose(fp32, int8, 2, load_model, never)
    assert again.path == int8 and cached["cached"] and cached["patches_per_s"] == record["patches_per_s"]
    other_threads, _ = precision.choose(fp32, int8, 1, load_model, _fake({"fp32": 900.0, "int8": 100.0})[0])
    assert other_threads.path == fp32  # another thread count is another measurement


def test_auto_keeps_fp32_when_int8_is_not_faster_enough(pair):
    fp32, int8 = pair
    model, record = precision.choose(fp32, int8, 2, load_model, _fake({"fp32": 1000.0, "int8": 1040.0})[0])
    assert model.path == fp32 and record["chosen"] == "fp32"


def test_auto_without_an_int8_file_is_fp32(pair, tmp_path):
    fp32, _ = pair
    model, record = precision.choose(fp32, tmp_path / "absent.onnx", 2, load_model)
    assert model.path == fp32 and "no int8 file" in record["why"]


def test_real_timing_gives_rates_and_run_json_records_the_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("IDC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(SAMPLE_PATIENT), "--out", str(out), "--no-review", "--precision", "auto"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())["model"]["precision"]
    assert record["requested"] == "auto" and record["chosen"] in ("fp32", "int8")
    if "patches_per_s" in record:  # both files shipped: both were timed
        assert all(rate > 0 for rate in record["patches_per_s"].values())


def test_precision_with_model_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            str(SAMPLE_PATIENT),
            "--out",
            str(tmp_path / "o"),
            "--precision",
            "fp32",
            "--model",
            str(default_model_path()),
        ],
    )
    assert result.exit_code == 2 and "--precision fp32" in result.output and "--model" in result.output


def test_int8_requested_but_not_shipped_names_the_reason(tmp_path, monkeypatch):
    import idc_infer.model as model_module

    real = model_module.shipped_model_path
    monkeypatch.setattr(model_module, "shipped_model_path", lambda p="fp32": None if p == "int8" else real(p))
    result = CliRunner().invoke(main, [str(SAMPLE_PATIENT), "--out", str(tmp_path / "o"), "--precision", "int8"])
    assert result.exit_code == 2 and "no int8 model is shipped" in result.output
