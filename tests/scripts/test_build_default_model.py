"""scripts/build_default_model.py ships only files that passed their gates, and says when int8 did not."""

import importlib.util
import json
import shutil
import sys

import pytest

from ..conftest import (
    REPO,
    require_module,  # noqa: E402
)

require_module("tf2onnx")


pytestmark = pytest.mark.tf


def _script():
    spec = importlib.util.spec_from_file_location("build_default_model", REPO / "scripts" / "build_default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_and_ship_copies_what_passed_and_removes_stale_int8(demo_run, tmp_path):
    from pathlib import Path

    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir, ignore=shutil.ignore_patterns("export", "checkpoints"))
    models = tmp_path / "models"
    models.mkdir()
    (models / "cancernet-int8.onnx").write_bytes(b"stale int8 of an earlier build")
    status = _script().export_and_ship(run_dir, models, Path(sys.executable).parent)
    report = json.loads((models / "export-report.json").read_text())
    assert status == (0 if report["int8_usable"] else 3)
    assert (models / "cancernet-fp32.onnx").read_bytes() == (run_dir / "export" / "cancernet-fp32.onnx").read_bytes()
    assert (models / "MODEL_CARD.md").exists()
    if report["int8_usable"]:
        assert (models / "cancernet-int8.onnx").read_bytes() == (
            run_dir / "export" / "cancernet-int8.onnx"
        ).read_bytes()
    else:
        assert not (models / "cancernet-int8.onnx").exists()  # never a stale or failed int8 beside the new fp32
