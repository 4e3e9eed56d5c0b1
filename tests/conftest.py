"""Shared fixtures: real data from ../shared when present, synthetic cohorts, a demo model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# idc-infer --precision auto caches its timing per machine: never in the user's own cache folder
os.environ.setdefault("IDC_CACHE_DIR", tempfile.mkdtemp(prefix="idc-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_PATIENT = REPO / "samples" / "10253"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The 14 real patients of ../shared/data/idc-real (skipped cleanly where absent)."""
    path = SHARED_DATA / "idc-real"
    if not path.is_dir():
        pytest.skip(f"real patches not available at {path}")
    return path


@pytest.fixture(scope="session")
def shared_sample() -> Path:
    path = SHARED_DATA / "idc-sample" / "10253"
    if not path.is_dir():
        pytest.skip(f"shared sample patches not available at {path}")
    return path


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory) -> Path:
    """Eight synthetic patients (6x6 grid each) in the Kaggle layout."""
    from idc_train.synthetic import write_cohort

    root = tmp_path_factory.mktemp("synthetic")
    write_cohort(root, n_patients=8, seed=3, grid=6)
    return root


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """A CancerNet trained briefly on synthetic patients (run dir with model.keras)."""
    from idc_train.synthetic import write_cohort
    from idc_train.training import TrainConfig, train

    data = tmp_path_factory.mktemp("demo-train-data")
    write_cohort(data, n_patients=6, seed=11, grid=7)
    run_dir = tmp_path_factory.mktemp("demo-run")
    train(TrainConfig(data, run_dir, epochs=3, batch_size=16, seed=0, patience=3))
    return run_dir


def tensorflow_available() -> bool:
    """TensorFlow is installed and not switched off (IDC_TESTS_WITHOUT_TF=1 runs the lab-side path here too)."""
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None and not os.environ.get("IDC_TESTS_WITHOUT_TF")


@pytest.fixture(scope="session")
def demo_onnx(request, tmp_path_factory) -> Path:
    """A demo model. With TensorFlow: a CancerNet trained briefly on synthetic patients and exported. Without
    (a lab-side install): the shipped graph under a demo contract (metadata edited with onnx), so the infer
    tests run in seconds with neither TensorFlow nor training."""
    out = tmp_path_factory.mktemp("demo-onnx") / "demo.onnx"
    if tensorflow_available():
        from idc_export.convert import export_fp32

        export_fp32(request.getfixturevalue("demo_run") / "model.keras", out, [SAMPLE_PATIENT])
        return out
    onnx = require_module("onnx")
    from idc_infer.contract import CONTRACT_KEY, Contract
    from idc_infer.model import default_model_path

    proto = onnx.load(str(default_model_path()))
    shipped = next(json.loads(p.value) for p in proto.metadata_props if p.key == CONTRACT_KEY)
    demo = Contract(
        threshold=0.5,
        patch_mpp=shipped["patch_mpp"],
        provenance={"demo": True, "training_data": "synthetic demo (test fixture: the shipped graph, demo contract)"},
    )
    for prop in proto.metadata_props:
        if prop.key == CONTRACT_KEY:
            prop.value = demo.to_json()
    onnx.save(proto, str(out))
    return out


# files whose bytes differ between any two runs of the same inputs (timings, the lock holder's pid)
RUN_SPECIFIC = {"run.json", "report.html", ".idc-lock"}


def run_outputs(out: Path) -> dict[str, bytes]:
    """Every file a run wrote into ``out`` (reports, review files, resume states), by relative path, but the
    run-specific ones: what two runs of the same inputs must write byte for byte alike."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in RUN_SPECIFIC
    }


def require_module(name: str):
    """A test dependency (the [test] extra): a lab-side install without it skips these tests with a reason;
    under CI (CI set, extras installed by .ci/run) a missing one is an error, never a silent skip."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{name} is not installed (pip install '.[test]')", allow_module_level=True)
