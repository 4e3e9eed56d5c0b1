"""Splits that do not fit the data say so: manifests, the published folds, --split folders."""

import logging
from pathlib import Path

import pytest

from idc_train.data import (
    LEAKY_WARNING,
    LabelledPatch,
    apply_split,
    discover_labelled,
    published_split,
    read_split_manifest,
    resolve_split,
)

from ..conftest import SAMPLE_PATIENT, require_module


def _patches(*pids: str) -> list[LabelledPatch]:
    return [
        LabelledPatch(Path(f"{pid}/{label}/{pid}_idx5_x1_y1_class{label}.png"), pid, label)
        for pid in pids
        for label in (0, 1)
    ]


def _manifest(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _touch(root: Path, *relative: str) -> None:
    for rel in relative:  # discovery reads names only
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def test_manifest_patients_missing_from_the_data_are_warned_about(tmp_path, caplog):
    manifest = _manifest(tmp_path / "split.csv", "patient_id,set\n1001,train\n1002,val\n99999,test\n")
    with caplog.at_level(logging.WARNING):
        sets, _ = resolve_split(str(manifest), _patches("1001", "1002", "1003"))
    assert sets["test"] == [] and {p.patient_id for p in sets["train"]} == {"1001"}
    text = caplog.text
    assert "1 of the 3 patient(s)" in text and "99999" in text
    assert "the test set is empty" in text
    assert "1003" in text and "left out" in text  # data patients the manifest does not mention


def test_split_sharing_no_patient_with_the_data_is_an_error():
    with pytest.raises(ValueError, match="patient ids do not match") as info:
        resolve_split("janowczyk2016", _patches("benign", "malignant"))
    message = str(info.value)
    assert "benign" in message and any(pid in message for pid in published_split("janowczyk2016"))
    with pytest.raises(ValueError, match="patient ids do not match"):
        apply_split(_patches("1001"), {})


def test_janowczyk_folds_with_missing_patients_are_not_the_published_folds(caplog):
    published = published_split("janowczyk2016")
    present = [
        next(pid for pid, name in published.items() if name == set_name) for set_name in ("train", "val", "test")
    ]
    with caplog.at_level(logging.WARNING):
        sets, _ = resolve_split("janowczyk2016", _patches(*present, "10253"))
    assert all(len(sets[name]) == 2 for name in ("train", "val", "test"))
    assert f"{len(published) - 3} of the {len(published)} patient(s)" in caplog.text
    assert "not on the same folds as the published numbers" in caplog.text
    assert "10253" in caplog.text


def test_complete_split_warns_about_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        apply_split(_patches("1", "2", "3"), {"1": "train", "2": "val", "3": "test"})
    assert caplog.text == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("patient,split\n1001,train\n", r"columns patient_id,set .*its columns are patient,split"),
        ("", r"columns patient_id,set"),
        ("patient_id,set\n1001,training\n", r"line 2: set 'training' of patient 1001 is not one of train, val, test"),
        ("patient_id,set\n1001,train\n1001,test\n", r"line 3: patient 1001 is in both train and test"),
        ("patient_id,set\n,train\n", r"line 2: no patient_id"),
    ],
)
def test_bad_manifest_names_the_file_and_what_is_expected(tmp_path, text, expected):
    manifest = _manifest(tmp_path / "my-split.csv", text)
    with pytest.raises(ValueError, match=expected) as info:
        read_split_manifest(manifest)
    assert "my-split.csv" in str(info.value)


def test_manifest_tolerates_spaces_and_capitals(tmp_path):
    manifest = _manifest(tmp_path / "split.csv", "patient_id, set,note\n 1001 , Train ,x\n1002,VAL,\n")
    assert read_split_manifest(manifest) == {"1001": "train", "1002": "val"}


def test_binary_manifest_is_a_value_error(tmp_path):
    manifest = tmp_path / "split.xlsx"
    manifest.write_bytes(b"PK\x03\x04\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="split.xlsx.*patient_id,set"):
        read_split_manifest(manifest)


def test_unknown_split_value_lists_the_choices():
    with pytest.raises(ValueError) as info:
        resolve_split("patients", _patches("1", "2", "3"))
    for choice in ("'patient'", "'folders'", "'janowczyk2016'", "'random-patch'", "patient_id,set"):
        assert choice in str(info.value)


def test_random_patch_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        resolve_split("random-patch", _patches("1", "2", "3"))
    assert caplog.text.count(LEAKY_WARNING) == 1


BREAKHIS_LIKE = (
    "train/benign/a.png",
    "train/malignant/b.png",
    "val/benign/c.png",
    "val/malignant/d.png",
    "test/benign/e.png",
    "test/malignant/f.png",
    "test/malignant/g.png",
)


def test_discovery_records_the_set_folder(tmp_path, synthetic_cohort):
    _touch(tmp_path, *BREAKHIS_LIKE, "Validation/1/h.png")
    found = {p.path.name: (p.set_folder, p.label) for p in discover_labelled(tmp_path)}
    assert found["a.png"] == ("train", 0) and found["d.png"] == ("val", 1) and found["g.png"] == ("test", 1)
    assert found["h.png"] == ("val", 1)
    assert {p.set_folder for p in discover_labelled(synthetic_cohort)} == {None}


def test_folders_split_keeps_the_dataset_sets(tmp_path):
    _touch(tmp_path, *BREAKHIS_LIKE)
    sets, assignment = resolve_split("folders", discover_labelled(tmp_path))
    assert {name: sorted(p.path.name for p in items) for name, items in sets.items()} == {
        "train": ["a.png", "b.png"],
        "val": ["c.png", "d.png"],
        "test": ["e.png", "f.png", "g.png"],
    }
    assert assignment["malignant"] == "test+train+val"  # no patient ids in these names: recorded as found


def test_patient_split_of_folder_data_without_patient_ids_points_at_folders(tmp_path):
    _touch(tmp_path, *BREAKHIS_LIKE)
    with pytest.raises(ValueError, match="--split folders"):
        resolve_split("patient", discover_labelled(tmp_path))


def test_patient_split_of_kaggle_patches_in_set_folders_mentions_folders(tmp_path, caplog):
    _touch(
        tmp_path,
        *(
            f"{set_name}/{pid}/{label}/{pid}_idx5_x1_y1_class{label}.png"
            for set_name, pid in (("train", "1001"), ("train", "1002"), ("val", "1003"), ("test", "1004"))
            for label in (0, 1)
        ),
    )
    with caplog.at_level(logging.WARNING):
        sets, _ = resolve_split("patient", discover_labelled(tmp_path))
    assert "--split folders" in caplog.text
    assert sum(len(items) for items in sets.values()) == 8


def test_folders_split_warns_about_patients_in_two_folders(tmp_path, caplog):
    _touch(
        tmp_path,
        "train/malignant/SOB_M_DC-14-2523-400-007.png",
        "test/malignant/SOB_M_DC-14-2523-100-001.png",
        "train/benign/SOB_B_A-14-22549AB-40-001.png",
        "loose/benign/x.png",
    )
    with caplog.at_level(logging.WARNING):
        sets, assignment = resolve_split("folders", discover_labelled(tmp_path))
    assert assignment == {"14-2523": "test+train", "14-22549AB": "train"}
    assert "14-2523" in caplog.text and "leaks" in caplog.text
    assert "the val set is empty" in caplog.text and "1 patch(es) lie outside" in caplog.text


def test_folders_split_needs_set_folders(synthetic_cohort):
    with pytest.raises(ValueError, match="train/, val/ and test/ folders"):
        resolve_split("folders", discover_labelled(synthetic_cohort))


def test_commands_on_an_install_without_tensorflow_name_the_extra(monkeypatch, tmp_path):
    """On a lab PC's inference-only install idc-train/idc-export say which extra to install."""
    import importlib.util

    from click.testing import CliRunner

    from idc_export.cli import main as export_main
    from idc_train.cli import main as train_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    (tmp_path / "m.keras").write_bytes(b"x")
    result = CliRunner().invoke(train_main, [str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "pip install 'idc[train]'" in result.output and "tensorflow" in result.output
    result = CliRunner().invoke(export_main, [str(tmp_path / "m.keras"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "pip install 'idc[export]'" in result.output


@pytest.mark.tf
def test_a_full_disk_in_training_is_exit_1_not_a_usage_error(monkeypatch, tmp_path):
    import errno

    from click.testing import CliRunner

    import idc_train.training as training
    from idc_train.cli import main as train_main

    def full(config):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "train", full)
    result = CliRunner().invoke(train_main, [str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "No space left on device" in result.output


@pytest.mark.tf
def test_a_bug_in_training_keeps_its_traceback_while_bad_data_is_a_usage_error(monkeypatch, tmp_path):
    """Only idc's own data errors become 'usage error' (exit 2): a ValueError from a bug is not the user's."""
    from click.testing import CliRunner

    import idc_train.training as training
    from idc_train.cli import main as train_main
    from idc_train.data import TrainingDataError

    def bug(config):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(training, "train", bug)
    result = CliRunner().invoke(train_main, [str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError) and "Usage" not in result.output

    def bad_data(config):
        raise TrainingDataError("the validation set has no IDC patch")

    monkeypatch.setattr(training, "train", bad_data)
    result = CliRunner().invoke(train_main, [str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "the validation set has no IDC patch" in result.output


@pytest.mark.tf
def test_idc_eval_on_a_file_that_is_no_model_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from idc_train.cli import eval_main

    require_module("keras")
    (tmp_path / "model.keras").write_bytes(b"not a keras file")
    result = CliRunner().invoke(
        eval_main, [str(tmp_path / "model.keras"), str(SAMPLE_PATIENT.parent), "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 2 and "not a loadable Keras model" in result.output
