"""Shared fixtures: real data from ../shared when present, synthetic cohorts, a demo model."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def demo_onnx(demo_run, tmp_path_factory) -> Path:
    from idc_export.convert import export_fp32

    out = tmp_path_factory.mktemp("demo-onnx") / "demo.onnx"
    export_fp32(demo_run / "model.keras", out, [SAMPLE_PATIENT])
    return out


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
