"""int8 export: both precisions from the demo model, the contract survives quantization, the accuracy gate bites."""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from ..conftest import require_module  # noqa: E402

require_module("tf2onnx")
require_module("onnxruntime.quantization")

from click.testing import CliRunner  # noqa: E402

from idc_export.cli import EXIT_INT8_GATE, main  # noqa: E402
from idc_export.quantize import (  # noqa: E402
    QuantSettings,
    accuracy_gate,
    balanced_sample,
    candidate_settings,
    even_batch_size,
    float_nodes,
)
from idc_infer.contract import Contract  # noqa: E402
from idc_infer.model import load_model, sha256_of  # noqa: E402
from idc_train.data import LabelledPatch  # noqa: E402

from ..conftest import SAMPLE_PATIENT  # noqa: E402

# one cheap recipe: the tests check the plumbing and the gate, not which recipe wins
FAST = [
    "--activation-type",
    "uint8",
    "--calibration-method",
    "minmax",
    "--weight-range",
    "reduced",
    "--bench-seconds",
    "0.1",
    "--calibration-patches",
    "32",
]


pytestmark = pytest.mark.tf


def run_export(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sample_tensors(contract: Contract) -> np.ndarray:
    from idc_export.convert import load_parity_inputs

    return load_parity_inputs(contract, [SAMPLE_PATIENT], n_random=0)


@pytest.fixture(scope="module")
def gate_cohort(tmp_path_factory) -> Path:
    """Held-out synthetic patients (ids unseen in training), large enough that one flip is not a 0.03 drop."""
    from idc_train.synthetic import write_cohort

    root = tmp_path_factory.mktemp("gate-cohort")
    write_cohort(root, n_patients=4, seed=29, grid=10, first_id=91001)
    return root


@pytest.fixture(scope="module")
def black_cohort(tmp_path_factory) -> Path:
    """Labelled all-black patches of an unknown patient: a deliberately useless calibration set."""
    root = tmp_path_factory.mktemp("black")
    for label in (0, 1):
        folder = root / "99001" / str(label)
        folder.mkdir(parents=True)
        for i in range(8):
            cv2.imwrite(str(folder / f"99001_idx5_x{50 * i}_y0_class{label}.png"), np.zeros((50, 50, 3), np.uint8))
    return root


@pytest.fixture(scope="module")
def good_export(demo_run, gate_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-good")
    result = run_export(demo_run / "model.keras", "--out", out, "--int8", "--gate-data", gate_cohort, *FAST)
    return out, result


def test_directory_export_writes_both_precisions_report_and_card(good_export):
    out, result = good_export
    assert result.exit_code == 0, result.output
    fp32, int8 = out / "cancernet-fp32.onnx", out / "cancernet-int8.onnx"
    assert fp32.is_file() and int8.is_file()
    assert not (out / "cancernet-int8.rejected.onnx").exists()
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size  # the point of int8 on the edge: size
    report = json.loads((out / "export-report.json").read_text())
    assert report["int8_usable"] is True and report["quantization"]["gate"]["passed"]
    assert report["files"]["int8"]["sha256"] == sha256_of(int8)
    for entry in report["files"].values():
        assert entry["throughput_patches_per_s"] > 0
    card = (out / "MODEL_CARD.md").read_text()
    for needle in (
        "RESEARCH USE ONLY",
        "cancernet-fp32.onnx",
        "cancernet-int8.onnx",
        "patches/s",
        "int8 accuracy gate: PASSED",
        "DEMO MODEL",
        "## Limits",
        "## Intended use",
    ):
        assert needle in card


def test_both_precisions_give_varying_and_close_outputs(good_export):
    out, _ = good_export
    fp32 = load_model(out / "cancernet-fp32.onnx")
    int8 = load_model(out / "cancernet-int8.onnx")
    inputs = sample_tensors(fp32.contract)
    p32, p8 = fp32.predict_prob_idc(inputs), int8.predict_prob_idc(inputs)
    assert np.std(p32) > 1e-3 and np.std(p8) > 1e-3  # not a collapsed model in either precision
    assert np.mean(np.abs(p32 - p8)) < 0.05


def test_contract_survives_quantization_and_is_read_by_infer(good_export):
    out, _ = good_export
    fp32 = load_model(out / "cancernet-fp32.onnx").contract
    int8 = load_model(out / "cancernet-int8.onnx").contract
    # preprocessing identical; each file has its own calibration, so its own calibrated threshold for the
    # same calls: both thresholds are the one raw threshold of training carried through each calibration
    own = dict(provenance={}, threshold=0.5, calibration=None, quantification=None)
    assert int8.replace(**own) == fp32.replace(**own)
    assert int8.calibration != fp32.calibration and int8.quantification["error_rates"]["per_patient"]
    raw = json.loads((out / "export-report.json").read_text())["calibration"]
    assert raw["fp32"]["raw_threshold"] == raw["int8"]["raw_threshold"]
    for contract in (fp32, int8):
        a, b = contract.calibration["a"], contract.calibration["b"]
        t = raw["fp32"]["raw_threshold"]
        assert contract.threshold == pytest.approx(1 / (1 + math.exp(-(a * math.log(t / (1 - t)) + b))))
    prov = int8.provenance
    assert prov["quantization_gate"] == "passed"
    assert prov["source_model_sha256"] == fp32.provenance["source_model_sha256"]
    # the int8 file announces its own gate-measured metrics, not the fp32 file's (defect 15)
    assert prov["fp32_metrics"] == fp32.provenance["metrics"]
    gate = prov["quantization_gate_results"]
    # (the values themselves may coincide: a demo model can score 1.0 on both sets)
    assert prov["metrics"]["roc_auc"] == gate["int8_roc_auc"]
    assert prov["metrics"]["balanced_accuracy"] == gate["int8_balanced_accuracy"]
    assert (prov["metrics"]["n"], prov["metrics"]["n_idc"]) == (gate["n_patches"], gate["n_idc"])
    assert prov["metrics_on"].startswith("this int8 file, on its accuracy gate's patches")
    assert prov["fp32_metrics_on"] == fp32.provenance["metrics_on"] != prov["metrics_on"]
    assert "int8" in int8.describe_training() and f"{gate['int8_roc_auc']:.3f}" in int8.describe_training()
    export = prov["export"]
    assert export["precision"] == "int8" and fp32.provenance["export"]["precision"] == "fp32"
    assert (export["activation_type"], export["calibration_method"], export["reduce_range"]) == (
        "uint8",
        "minmax",
        True,
    )
    assert export["calibration_patches"] > 0 and export["fp32_sha256"] == sha256_of(out / "cancernet-fp32.onnx")
    assert any("Softmax" in name for name in export["nodes_left_in_float"])
    gate = prov["quantization_gate_results"]
    assert gate["roc_auc_drop"] <= 0.005 and gate["balanced_accuracy_drop"] <= 0.01


def test_gate_rejects_black_calibration_and_says_why(demo_run, gate_cohort, black_cohort, good_export, tmp_path):
    # a usable int8 file from an earlier export sits in the directory: it must not survive a failed gate
    (tmp_path / "cancernet-int8.onnx").write_bytes((good_export[0] / "cancernet-int8.onnx").read_bytes())
    result = run_export(
        demo_run / "model.keras",
        "--out",
        tmp_path,
        "--int8",
        "--calibration",
        black_cohort,
        "--gate-data",
        gate_cohort,
        *FAST,
    )
    assert result.exit_code == EXIT_INT8_GATE, result.output
    assert "INT8 ACCURACY GATE FAILED" in result.stderr
    assert "ROC-AUC dropped" in result.stderr or "balanced accuracy" in result.stderr
    assert not (tmp_path / "cancernet-int8.onnx").exists()
    rejected = load_model(tmp_path / "cancernet-int8.rejected.onnx")
    assert rejected.contract.provenance["quantization_gate"] == "failed"
    assert (tmp_path / "cancernet-fp32.onnx").is_file()  # fp32 is still good
    report = json.loads((tmp_path / "export-report.json").read_text())
    assert report["int8_usable"] is False and report["quantization"]["gate"]["reasons"]
    assert "int8 accuracy gate: FAILED" in (tmp_path / "MODEL_CARD.md").read_text()


def test_int8_needs_a_directory(demo_run, tmp_path):
    result = run_export(demo_run / "model.keras", "--out", tmp_path / "m.onnx", "--int8")
    assert result.exit_code == 2 and "directory" in result.output


def test_single_file_mode_still_writes_one_fp32_file(demo_run, tmp_path):
    result = run_export(demo_run / "model.keras", "--out", tmp_path / "m.onnx", "--parity-data", SAMPLE_PATIENT)
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "m.onnx").contract.provenance["export"]["precision"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.export.json", "m.onnx"]


# ---------------------------------------------------------------- pure parts


def test_accuracy_gate_limits():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 200 + [1] * 200)
    fp32 = np.clip(labels * 0.6 + rng.uniform(0, 0.4, 400), 0, 1)
    same = accuracy_gate(labels, fp32, fp32, 0.5)
    assert same.passed and same.numbers["label_flips"] == 0 and same.numbers["max_abs_prob_diff"] == 0
    noisy = accuracy_gate(labels, fp32, rng.uniform(0, 1, 400), 0.5)
    assert not noisy.passed
    assert any("ROC-AUC dropped" in r for r in noisy.reasons) and any("balanced accuracy" in r for r in noisy.reasons)
    one_class = accuracy_gate(np.zeros(10, int), fp32[:10], fp32[:10], 0.5)
    assert not one_class.passed and "both classes" in one_class.reasons[0]
    assert one_class.as_dict()["roc_auc_drop"] is None  # JSON-safe, no NaN


def test_balanced_sample_is_seeded_balanced_and_disjoint():
    patches = [LabelledPatch(Path(f"p/{i:03d}.png"), "1", int(i % 3 == 0)) for i in range(90)]
    first = balanced_sample(patches, 10, seed=4)
    assert first == balanced_sample(list(reversed(patches)), 10, seed=4)  # order of discovery does not matter
    assert sum(p.label for p in first) == 10 and len(first) == 20
    rest = balanced_sample(patches, 10, seed=5, exclude=frozenset(p.path for p in first))
    assert not {p.path for p in rest} & {p.path for p in first}
    halves = balanced_sample(patches, 100, seed=4, max_fraction=0.5)
    assert sum(p.label for p in halves) == 15 and len(halves) == 45


def test_even_batch_size_divides():
    assert even_batch_size(256) == 32
    assert even_batch_size(98) == 14
    assert even_batch_size(97) == 1
    assert even_batch_size(5) == 5


def test_candidates_cover_the_requested_axes():
    assert len(candidate_settings()) == 12  # 2 activation types x 3 methods x 2 weight ranges
    assert candidate_settings("uint8", "minmax", "reduced", "float") == [QuantSettings("uint8", "minmax", True, True)]
    with pytest.raises(ValueError):
        QuantSettings("int4")


def test_float_nodes_leave_softmax_and_final_dense(demo_onnx):
    with_head = float_nodes(demo_onnx, float_head=True)
    without = float_nodes(demo_onnx, float_head=False)
    assert len(without) == 1 and "Softmax" in without[0]
    assert len(with_head) > 1 and with_head[0] == without[0]


def test_calibration_and_gate_keep_training_and_held_out_patients_apart(tmp_path):
    from idc_export.quantize import calibration_pool, gate_set
    from idc_train.synthetic import write_cohort

    write_cohort(tmp_path, n_patients=3, seed=1, grid=3)  # patients 90001..90003
    meta = {"data_dir": str(tmp_path), "split": {"train": ["90001"], "val": ["90002"], "test": ["90003"]}}
    pool, _ = calibration_pool(meta, None)
    assert {p.patient_id for p in pool} == {"90001"}
    assert gate_set(meta, Contract(), None).patients == ["90002"]
    # an explicit gate directory holding training patients: they are left out of the gate
    gate = gate_set(meta, Contract(), tmp_path)
    assert gate.patients == ["90002", "90003"] and "left out" in gate.description
    # a calibration directory without the split's training patients: never the validation/test patients
    other = {"split": {"train": ["80001"], "val": ["90002"], "test": ["90003"]}}
    pool, where = calibration_pool(other, tmp_path)
    assert {p.patient_id for p in pool} == {"90001"} and "excluded" in where


def test_gate_patients_never_calibrate(tmp_path):
    """Without train_meta.json, --calibration and --gate-data may overlap: the gate's patients are left out."""
    from idc_export.quantize import QuantizationError, calibration_sets, gate_set
    from idc_train.synthetic import write_cohort

    write_cohort(tmp_path / "all", n_patients=3, seed=1, grid=3)  # 90001..90003
    write_cohort(tmp_path / "gate", n_patients=2, seed=2, grid=3)  # 90001..90002: overlaps
    gate = gate_set(None, Contract(), tmp_path / "gate")
    calibration, selection = calibration_sets(None, Contract(), tmp_path / "all", 4, gate=gate)
    assert set(calibration.patients) | set(selection.patients) == {"90003"}
    assert "accuracy gate left out" in calibration.description
    with pytest.raises(QuantizationError, match="other patients than --gate-data"):
        calibration_sets(None, Contract(), tmp_path / "gate", 4, gate=gate)  # the very same patches


def test_class_folders_without_patient_ids_can_calibrate_and_gate(tmp_path):
    """Folders of 0/ and 1/ give pseudo patient ids ('0', '1'): two such folders are not an overlap."""
    import cv2

    from idc_export.quantize import calibration_sets, gate_set

    rng = np.random.default_rng(0)
    for root in ("calibration", "gate"):
        for label in ("0", "1"):
            folder = tmp_path / root / label
            folder.mkdir(parents=True)
            for i in range(6):
                cv2.imwrite(str(folder / f"p{i}.png"), rng.integers(0, 255, (50, 50, 3), dtype=np.uint8))
    gate = gate_set(None, Contract(), tmp_path / "gate")
    calibration, _ = calibration_sets(None, Contract(), tmp_path / "calibration", 3, gate=gate)
    assert len(calibration) == 6 and not calibration.paths & gate.paths


def test_per_patch_split_calibrates_on_other_patches_of_the_gated_patients(tmp_path):
    """--split random-patch puts every patient on both sides: calibration keeps to the non-gate patches."""
    from idc_export.quantize import calibration_sets, decode_patch_set
    from idc_train.data import discover_labelled
    from idc_train.synthetic import write_cohort

    write_cohort(tmp_path, n_patients=2, seed=3, grid=4)
    patches = discover_labelled(tmp_path)
    gate = decode_patch_set(patches[::2], Contract(), "every other patch")
    calibration, selection = calibration_sets(None, Contract(), tmp_path, 3, gate=gate)
    assert set(calibration.patients) == set(gate.patients)  # the same patients...
    assert not (calibration.paths | selection.paths) & gate.paths  # ...never the same patches
    assert "optimistic" in calibration.description
