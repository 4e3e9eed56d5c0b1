"""Patient discovery as a user meets it: which patients are found, how many patches each, what is skipped."""

import csv
import json
import logging
import os
import types

import click
import pytest
from click.testing import CliRunner

from idc_infer.cli import main
from idc_infer.discover import SkipCounter, patients_from_dirs, patients_from_list
from idc_train.synthetic import write_cohort, write_patient

from ..conftest import SAMPLE_PATIENT

SAMPLE_PATHS = sorted(SAMPLE_PATIENT.rglob("*.png"))


def found(patients, skipped=None):
    """patient id -> number of patch paths, as the engine would score them."""
    skipped = SkipCounter() if skipped is None else skipped
    return {p.patient_id: len(list(p.iter_paths(skipped))) for p in patients}


def symlink_or_skip(target, link):
    try:
        os.symlink(target, link, target_is_directory=True)
    except (OSError, NotImplementedError):  # Windows without the symlink privilege
        pytest.skip("symbolic links not available here")


def open_as_cli_does(path):
    """The list file object idc-infer's --from-list hands to patients_from_list."""
    return click.File(encoding="utf-8-sig").convert(str(path), None, None)


def test_link_back_up_the_tree_scores_each_patch_once(tmp_path):
    written = write_patient(tmp_path / "cohort", "90001", grid=3)
    symlink_or_skip("..", tmp_path / "cohort" / "90001" / "1" / "back")  # ln -s .. back: a loop
    skipped = SkipCounter()
    [patient] = patients_from_dirs([tmp_path / "cohort"])
    paths = patient.iter_paths(skipped)
    assert isinstance(paths, types.GeneratorType)  # still lazy: huge folders are never listed whole
    paths = list(paths)
    assert patient.patient_id == "90001"
    assert sorted(p.resolve() for p in paths) == sorted(w.path.resolve() for w in written)
    assert skipped.counts["link to a directory already walked"] == 1


def test_two_links_to_one_folder_walk_it_once(tmp_path):
    written = write_patient(tmp_path, "90001", grid=3)
    patient_dir = tmp_path / "90001"
    (patient_dir / "extra").mkdir()
    symlink_or_skip(patient_dir / "0", patient_dir / "extra" / "again")
    symlink_or_skip(patient_dir / "0", patient_dir / "extra" / "and_again")
    skipped = SkipCounter()
    assert found(patients_from_dirs([patient_dir]), skipped) == {"90001": len(written)}
    assert skipped.counts["link to a directory already walked"] == 2


def test_stray_image_in_cohort_root_is_skipped_not_merged(tmp_path, caplog):
    root = tmp_path / "cohort"
    written = write_cohort(root, n_patients=2, grid=4)
    (root / "overview.png").write_bytes(written[0].path.read_bytes())
    skipped = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="idc_infer"):
        patients = patients_from_dirs([root], skipped=skipped)
    per_patient = {pid: sum(w.patient_id == pid for w in written) for pid in ("90001", "90002")}
    assert found(patients) == per_patient
    assert skipped.counts == {"image beside patient folders in a cohort root": 1}
    assert "overview.png" in caplog.text and str(root) in caplog.text


def test_unlabelled_cohort_root_with_stray_image(tmp_path):
    for pid in ("slideA", "slideB"):
        (tmp_path / "cohort" / pid).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "cohort" / pid / f"tile_{i}.png").write_bytes(SAMPLE_PATHS[i].read_bytes())
    (tmp_path / "cohort" / "thumbnail.jpg").write_bytes(SAMPLE_PATHS[0].read_bytes())
    skipped = SkipCounter()
    assert found(patients_from_dirs([tmp_path / "cohort"], skipped=skipped)) == {"slideA": 3, "slideB": 3}
    assert skipped.total == 1


@pytest.mark.parametrize("extra", ["notes", "rescan"])
def test_patient_dirs_with_extra_folders_stay_one_patient(tmp_path, extra):
    # label folders plus an extra one; flat Kaggle-named patches plus a subfolder of more
    labelled = write_patient(tmp_path, "90001", grid=3)
    (tmp_path / "90001" / extra).mkdir()
    flat = tmp_path / "10253"
    flat.mkdir()
    for path in SAMPLE_PATHS:
        (flat / path.name).write_bytes(path.read_bytes())
    (flat / extra).mkdir()
    (flat / extra / SAMPLE_PATHS[0].name).write_bytes(SAMPLE_PATHS[0].read_bytes())
    if extra == "rescan":
        (tmp_path / "90001" / extra / "more.png").write_bytes(SAMPLE_PATHS[0].read_bytes())
    n_extra = 1 if extra == "rescan" else 0
    assert found(patients_from_dirs([tmp_path / "90001", flat])) == {
        "90001": len(labelled) + n_extra,
        "10253": len(SAMPLE_PATHS) + 1,
    }


def test_sample_patient_and_plain_cohort_unchanged(tmp_path):
    assert found(patients_from_dirs([SAMPLE_PATIENT])) == {"10253": len(SAMPLE_PATHS)}
    written = write_cohort(tmp_path, n_patients=3, grid=3)
    skipped = SkipCounter()
    assert found(patients_from_dirs([tmp_path], skipped=skipped)) == {
        pid: sum(w.patient_id == pid for w in written) for pid in ("90001", "90002", "90003")
    }
    assert skipped.total == 0  # the IDC_SYNTHETIC_DATA.txt marker is not a stray image


def test_windows_1252_list_is_a_value_error_naming_the_file(tmp_path):
    listing = tmp_path / "liste_patiënts.txt"
    text = f"{SAMPLE_PATHS[0]}\n{SAMPLE_PATHS[1]}\n/data/Zoë/{SAMPLE_PATHS[2].name}\n"
    listing.write_bytes(text.encode("cp1252"))  # Excel "Text (Tab delimited)"
    with open_as_cli_does(listing) as lines, pytest.raises(ValueError) as error:
        patients_from_list(lines, tmp_path, SkipCounter())
    message = str(error.value)
    assert str(listing) in message
    assert "UTF-8" in message and "one patch path per line" in message
    assert "line 3" in message


def test_list_that_is_not_utf8_without_a_name(tmp_path):
    def lines():
        yield "a.png\n"
        raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")

    with pytest.raises(ValueError, match="the list is not UTF-8 text"):
        patients_from_list(lines(), tmp_path, SkipCounter())


def test_utf16_list_with_bom_is_read(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes("\r\n".join(str(p) for p in SAMPLE_PATHS).encode("utf-16"))  # Notepad "Unicode"
    skipped = SkipCounter()
    with open_as_cli_does(listing) as lines:
        patients = patients_from_list(lines, tmp_path, skipped)
    assert found(patients) == {"10253": len(SAMPLE_PATHS)}
    assert skipped.total == 0


def test_duplicate_list_lines_are_scored_once(tmp_path):
    symlink_or_skip(SAMPLE_PATIENT / "0", tmp_path / "linked0")
    zeros = [p for p in SAMPLE_PATHS if p.parent.name == "0"]
    lines = [str(p) for p in SAMPLE_PATHS]
    lines += [str(zeros[0])]  # the same line again
    lines += [str(zeros[1].parent / ".." / "0" / zeros[1].name)]  # another route to the same file
    lines += [f"linked0/{zeros[2].name}"]  # relative, through a link to the same folder
    skipped = SkipCounter()
    patients = patients_from_list([line + "\n" for line in lines], tmp_path, skipped)
    assert found(patients) == {"10253": len(SAMPLE_PATHS)}
    assert skipped.counts == {"path listed more than once": 3}


def test_list_line_with_nul_byte_does_not_stop_discovery(tmp_path):
    lines = [f"{SAMPLE_PATHS[0]}\n", "a.png\x00b.png\n", "bad\x00dir/c.png\n", f"{SAMPLE_PATHS[1]}\n"]
    patients = patients_from_list(lines, tmp_path, SkipCounter())
    paths = [p for patient in patients for p in patient.paths]
    assert len(paths) == 4  # kept: the decoder reports the odd rows, the run goes on
    assert sum("\x00" in str(p) for p in paths) == 2


def test_duplicate_list_lines_do_not_inflate_the_report(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n{p}\n" for p in SAMPLE_PATHS), encoding="utf-8")
    result = CliRunner().invoke(
        main, ["--from-list", str(listing), "--out", str(tmp_path / "out"), "--no-review"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "10253.csv", newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == len(SAMPLE_PATHS)
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as handle:
        assert [row["n_patches"] for row in csv.DictReader(handle)] == [str(len(SAMPLE_PATHS))]
    counts = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))["counts"]
    assert counts["skipped_by_reason"] == {"path listed more than once": len(SAMPLE_PATHS)}


def test_a_link_out_of_the_patient_folder_is_not_followed(tmp_path, caplog):
    """`ln -s ../.. up` inside patient 90001 of a cohort would pull patient 90002's patches into 90001
    and count them twice in the cohort: the walk stays inside each patient's folder."""
    written = write_cohort(tmp_path / "cohort", n_patients=2, grid=3)
    symlink_or_skip(tmp_path / "cohort", tmp_path / "cohort" / "90001" / "0" / "up")
    skipped = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="idc_infer"):
        counts = found(patients_from_dirs([tmp_path / "cohort"]), skipped)
    assert counts == {pid: sum(w.patient_id == pid for w in written) for pid in ("90001", "90002")}
    assert skipped.counts["link to a folder outside the patient"] == 1
    assert "links outside the patient folder" in caplog.text


def test_patches_in_a_subfolder_named_after_the_patient_stay_that_patient(tmp_path):
    """idc-infer nested/8863 with its patches in 8863/tiles/ is patient 8863, not a cohort with patient 'tiles'."""
    written = write_patient(tmp_path / "nested", "8863", grid=3)
    patient_dir = tmp_path / "nested" / "8863"
    (patient_dir / "tiles").mkdir()
    for w in written:
        w.path.rename(patient_dir / "tiles" / w.path.name)
    for label_dir in ("0", "1"):
        if (patient_dir / label_dir).is_dir():
            (patient_dir / label_dir).rmdir()
    assert found(patients_from_dirs([patient_dir]), SkipCounter()) == {"8863": len(written)}
    # a real cohort root of two patients is still a cohort
    write_cohort(tmp_path / "cohort", n_patients=2, grid=3)
    assert set(found(patients_from_dirs([tmp_path / "cohort"]), SkipCounter())) == {"90001", "90002"}


def test_patches_in_class_folders_of_a_subfolder_stay_that_patient(tmp_path):
    """8863/tiles/0/ and 8863/tiles/1/ holding 8863_idx5_... files: still patient 8863, labels kept."""
    written = write_patient(tmp_path / "nested", "8863", grid=3)
    patient_dir = tmp_path / "nested" / "8863"
    for label_dir in ("0", "1"):
        if (patient_dir / label_dir).is_dir():
            (patient_dir / "tiles").mkdir(exist_ok=True)
            (patient_dir / label_dir).rename(patient_dir / "tiles" / label_dir)
    [patient] = patients_from_dirs([patient_dir])
    assert patient.patient_id == "8863"
    assert found([patient], SkipCounter()) == {"8863": len(written)}


def test_a_cohort_folder_named_like_a_class_is_still_a_cohort(tmp_path):
    """datasets/idc/<patients>: a folder named idc without images of its own is not the IDC class folder."""
    written = write_cohort(tmp_path / "datasets" / "idc", n_patients=2, grid=3)
    counts = found(patients_from_dirs([tmp_path / "datasets" / "idc"]), SkipCounter())
    assert counts == {pid: sum(w.patient_id == pid for w in written) for pid in ("90001", "90002")}
