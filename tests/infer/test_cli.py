"""idc-infer driven as a user drives it: files written, exit codes, messages."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from idc_infer.cli import main
from idc_train.synthetic import write_cohort, write_faulty_files

from ..conftest import SAMPLE_PATIENT


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_sample_patient_with_default_model(tmp_path):
    result = run([SAMPLE_PATIENT, "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "10253.csv")
    assert len(rows) == 11 and all(r["status"] == "ok" for r in rows)
    assert {r["label"] for r in rows} == {"0", "1"}
    summary = read_csv(tmp_path / "out" / "summary.csv")
    assert [s["patient_id"] for s in summary] == ["10253"]
    assert summary[0]["notice"] == "research use only; not for diagnosis"
    run_info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_info["model"]["demo"] is False
    assert run_info["counts"]["patches"] == 11
    assert "RESEARCH USE ONLY" in result.stderr


def test_summary_fractions_agree_with_rows(tmp_path, demo_onnx):
    root = tmp_path / "cohort"
    write_cohort(root, n_patients=3, seed=5, grid=5)
    write_faulty_files(root / "faulty")
    result = run([root, "--model", demo_onnx, "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    summary = {s["patient_id"]: s for s in read_csv(tmp_path / "out" / "summary.csv")}
    assert set(summary) == {"90001", "90002", "90003", "faulty", "(cohort)"}
    for pid in ("90001", "90002", "90003", "faulty"):
        rows = read_csv(tmp_path / "out" / f"{pid}.csv")
        scored = [r for r in rows if r["status"] == "ok"]
        n_idc = sum(r["pred"] == "1" for r in scored)
        assert int(summary[pid]["n_patches"]) == len(rows)
        assert int(summary[pid]["n_scored"]) == len(scored)
        background = [r for r in rows if r["status"] == "background"]
        blurred = [r for r in rows if r["status"] == "blurred"]
        assert int(summary[pid]["n_background"]) == len(background)
        assert int(summary[pid]["n_blurred"]) == len(blurred)
        # quality-control skips are counted apart: they are neither scored nor failures
        assert int(summary[pid]["n_failed"]) == len(rows) - len(scored) - len(background) - len(blurred)
        assert int(summary[pid]["n_idc"]) == n_idc
        assert float(summary[pid]["idc_fraction"]) == pytest.approx(n_idc / len(scored), abs=1e-6)
        low, high = float(summary[pid]["idc_fraction_ci95_low"]), float(summary[pid]["idc_fraction_ci95_high"])
        assert low <= n_idc / len(scored) <= high
    assert summary["faulty"]["n_failed"] == "4"
    assert int(summary["(cohort)"]["n_patches"]) == sum(
        int(summary[p]["n_patches"]) for p in summary if p != "(cohort)"
    )
    run_info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_info["counts"]["skipped_files"] == 3  # .DS_Store, Thumbs.db, readme.txt
    assert run_info["model"]["demo"] is True
    assert "DEMO MODEL" in result.stderr


def test_faulty_rows_and_strict(tmp_path, demo_onnx):
    expected = write_faulty_files(tmp_path / "faulty")
    expected["gray.png"] = "background"  # decodable, but without stain colour: quality control skips it
    result = run([tmp_path / "faulty", "--model", demo_onnx, "--out", tmp_path / "out"])
    assert result.exit_code == 0
    rows = {r["path"]: r for r in read_csv(tmp_path / "out" / "faulty.csv")}
    assert {name.lstrip("=") for name in expected} == {p.lstrip("'=") for p in rows}
    for name, status in expected.items():
        key = "'" + name if name.startswith("=") else name
        assert rows[key]["status"] == status
        assert (rows[key]["prob_idc"] != "") == (status == "ok")
    strict = run([tmp_path / "faulty", "--model", demo_onnx, "--out", tmp_path / "out2", "--strict"])
    assert strict.exit_code == 1


def _with_contract(source, target, provenance=None, **fields):
    """A copy of an ONNX model whose idc.contract has some fields changed."""
    import onnx

    from idc_infer.contract import CONTRACT_KEY

    proto = onnx.load(str(source))
    for prop in proto.metadata_props:
        if prop.key == CONTRACT_KEY:
            contract = json.loads(prop.value)
            contract.update(fields)
            contract["provenance"].update(provenance or {})
            prop.value = json.dumps(contract)
    onnx.save(proto, str(target))
    return target


@pytest.mark.parametrize("problem", ["missing", "directory", "not_onnx", "no_contract", "contract_mismatch"])
def test_bad_model_is_a_usage_error(tmp_path, demo_onnx, problem):
    model = tmp_path / "model.onnx"
    if problem == "directory":
        model.mkdir()
    elif problem == "not_onnx":
        model.write_text("not a model")
    elif problem == "no_contract":
        import onnx

        proto = onnx.load(str(demo_onnx))
        del proto.metadata_props[:]
        onnx.save(proto, str(model))
    elif problem == "contract_mismatch":  # the contract says 50x50 patches, the graph takes 48x48
        _with_contract(demo_onnx, model, input_height_px=50, input_width_px=50)
    result = run([SAMPLE_PATIENT, "--model", model, "--out", tmp_path / "out"])
    assert result.exit_code == 2
    assert str(model) in result.output
    assert "Traceback" not in result.output
    expected = {"no_contract": "idc.contract", "directory": "is a directory", "contract_mismatch": "inconsistent"}
    assert expected.get(problem, "") in result.output
    assert not (tmp_path / "out").exists()


def test_model_that_failed_its_int8_gate_is_refused_unless_allowed(tmp_path, demo_onnx):
    model = _with_contract(demo_onnx, tmp_path / "rejected.onnx", provenance={"quantization_gate": "failed"})
    refused = run([SAMPLE_PATIENT, "--model", model, "--out", tmp_path / "a"])
    assert refused.exit_code == 2 and "failed its int8 accuracy gate" in refused.output
    assert not (tmp_path / "a").exists()
    allowed = run([SAMPLE_PATIENT, "--model", model, "--out", tmp_path / "b", "--allow-failed-gate", "-q"])
    assert allowed.exit_code == 0
    assert "FAILED its int8 accuracy gate" in allowed.stderr  # said even with --quiet


def test_bad_arguments_are_usage_errors(tmp_path):
    assert run([tmp_path / "nope"]).exit_code == 2
    for bad_threshold in ("1.5", "nan", "-0.1"):
        bad = run([SAMPLE_PATIENT, "--threshold", bad_threshold, "--out", tmp_path / "o"])
        assert bad.exit_code == 2 and bad_threshold in bad.output
    assert not (tmp_path / "o").exists()


def test_existing_reports_are_not_overwritten_silently(tmp_path):
    out = tmp_path / "out"
    assert run([SAMPLE_PATIENT, "--out", out]).exit_code == 0
    again = run([SAMPLE_PATIENT, "--out", out])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert run([SAMPLE_PATIENT, "--out", out, "--overwrite"]).exit_code == 0


def test_empty_directory_gives_zero_row(tmp_path):
    (tmp_path / "empty_patient").mkdir()
    result = run([tmp_path / "empty_patient", "--out", tmp_path / "out"])
    assert result.exit_code == 0
    summary = read_csv(tmp_path / "out" / "summary.csv")
    assert summary[0]["n_patches"] == "0" and summary[0]["idc_fraction"] == ""


def test_threshold_override_changes_calls(tmp_path):
    low = run([SAMPLE_PATIENT, "--out", tmp_path / "a", "--threshold", "0"])
    assert low.exit_code == 0
    assert read_csv(tmp_path / "a" / "summary.csv")[0]["n_idc"] == "11"
    high = run([SAMPLE_PATIENT, "--out", tmp_path / "b", "--threshold", "1"])
    assert high.exit_code == 0
    assert read_csv(tmp_path / "b" / "summary.csv")[0]["n_idc"] in ("0", "1")


def test_from_list_matches_directory_run(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(SAMPLE_PATIENT.rglob("*.png"))) + "\n")
    assert run(["--from-list", listing, "--out", tmp_path / "a"]).exit_code == 0
    assert run([SAMPLE_PATIENT, "--out", tmp_path / "b"]).exit_code == 0
    a = [(r["prob_idc"], r["label"]) for r in read_csv(tmp_path / "a" / "10253.csv")]
    b = [(r["prob_idc"], r["label"]) for r in read_csv(tmp_path / "b" / "10253.csv")]
    assert sorted(a) == sorted(b)


def test_cohort_root_and_several_patient_dirs_equal_separate_calls(tmp_path, demo_onnx):
    root = tmp_path / "cohort"
    write_cohort(root, n_patients=2, seed=9, grid=4)
    assert run([root, "--model", demo_onnx, "--out", tmp_path / "together"]).exit_code == 0
    assert run([root / "90001", root / "90002", "--model", demo_onnx, "--out", tmp_path / "listed"]).exit_code == 0
    for pid in ("90001", "90002"):
        assert run([root / pid, "--model", demo_onnx, "--out", tmp_path / pid]).exit_code == 0
        alone = (tmp_path / pid / f"{pid}.csv").read_bytes()
        assert (tmp_path / "together" / f"{pid}.csv").read_bytes() == alone
        assert (tmp_path / "listed" / f"{pid}.csv").read_bytes() == alone


def test_resume_skips_completed_patients_and_matches_clean_run(tmp_path, demo_onnx):
    root = tmp_path / "cohort"
    write_cohort(root, n_patients=3, seed=2, grid=4)
    clean = tmp_path / "clean"
    assert run([root, "--model", demo_onnx, "--out", clean]).exit_code == 0
    partial = tmp_path / "partial"
    shutil.copytree(clean, partial)
    (partial / "90002.csv").write_text("path,x\nhalf")  # as if 90002 had not completed
    (partial / "summary.csv").unlink()
    result = run([root, "--model", demo_onnx, "--out", partial, "--resume"])
    assert result.exit_code == 0
    info = json.loads((partial / "run.json").read_text())
    assert info["counts"]["patients_resumed"] == 2
    for name in ("90001.csv", "90002.csv", "90003.csv", "summary.csv"):
        assert (partial / name).read_bytes() == (clean / name).read_bytes()


def test_resume_redoes_patients_finished_with_other_review_settings(tmp_path, demo_onnx):
    root = tmp_path / "cohort"
    write_cohort(root, n_patients=2, seed=2, grid=4)
    out = tmp_path / "out"
    assert run([root, "--model", demo_onnx, "--out", out, "--no-review"]).exit_code == 0
    assert not list(out.glob("*_mosaic.png"))
    result = run([root, "--model", demo_onnx, "--out", out, "--resume"])  # now with review outputs
    assert result.exit_code == 0
    assert json.loads((out / "run.json").read_text())["counts"]["patients_resumed"] == 0
    assert sorted(p.name for p in out.glob("*_mosaic.png")) == ["90001_mosaic.png", "90002_mosaic.png"]
    again = run([root, "--model", demo_onnx, "--out", out, "--resume"])  # same settings: nothing to redo
    assert json.loads((out / "run.json").read_text())["counts"]["patients_resumed"] == 2 and again.exit_code == 0


def test_verbose_logs_what_it_does(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "idc_infer", str(SAMPLE_PATIENT), "--out", str(tmp_path / "o"), "--no-review", "-v"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 patient(s) to score" in proc.stderr and "patient 10253: 11 patches, 0 failed" in proc.stderr
    quiet = subprocess.run(
        [sys.executable, "-m", "idc_infer", str(SAMPLE_PATIENT), "--out", str(tmp_path / "q"), "--no-review", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert quiet.returncode == 0 and "patient 10253: 11 patches" not in quiet.stderr


def loaded_packages(code: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` that a fresh interpreter has imported after running ``code``."""
    check = f"import sys\nprint('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in {packages!r}))\n"
    out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, check=True).stdout
    return json.loads(out.rsplit("LOADED", 1)[1].strip().replace("'", '"'))


def test_infer_never_imports_tensorflow_nor_the_optional_extras(tmp_path):
    """A patch-folder run on a lab PC: no TensorFlow, and neither Dask nor the slide readers (optional extras)."""
    code = (
        "from idc_infer.cli import main\n"
        f"try:\n    main([{str(SAMPLE_PATIENT)!r}, '--out', {str(tmp_path / 'o')!r}, '-q'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
    )
    forbidden = ("tensorflow", "keras", "tf2onnx", "onnx", "dask", "distributed", "tiffslide", "openslide")
    assert loaded_packages(code, forbidden) == []
    assert (tmp_path / "o" / "10253.csv").exists()


def test_default_out_inside_the_patient_dir_is_refused_and_a_cohort_root_is_fine(tmp_path, monkeypatch):
    """`cd 10253 && idc-infer .` would put ./idc-reports among the patient's patches: a clear usage error.
    Reports inside a cohort root (beside the patients) are fine and never scored on a rerun."""
    patient = tmp_path / "cohort" / "10253"
    shutil.copytree(SAMPLE_PATIENT, patient)
    monkeypatch.chdir(patient)
    refused = run(["."])
    assert refused.exit_code == 2 and "inside the folder of patient 10253" in refused.output
    assert not (patient / "idc-reports").exists()
    monkeypatch.chdir(tmp_path / "cohort")
    assert run(["."]).exit_code == 0
    again = run([".", "--overwrite", "--strict"])
    assert again.exit_code == 0, again.output
    summary = read_csv(tmp_path / "cohort" / "idc-reports" / "summary.csv")
    assert [s["patient_id"] for s in summary] == ["10253"] and summary[0]["n_patches"] == "11"


def test_ids_that_collide_as_file_names_are_a_usage_error(tmp_path):
    for name in ("a b", "a_b"):
        shutil.copytree(SAMPLE_PATIENT, tmp_path / "cohort" / name)
    result = run([tmp_path / "cohort", "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "a b" in result.output and "a_b" in result.output


def test_overwrite_removes_stale_review_outputs(tmp_path):
    out = tmp_path / "out"
    assert run([SAMPLE_PATIENT, "--out", out]).exit_code == 0
    assert (out / "report.html").exists() and (out / "10253_mosaic.png").exists()
    assert run([SAMPLE_PATIENT, "--out", out, "--overwrite", "--no-review"]).exit_code == 0
    assert not (out / "report.html").exists() and not (out / "10253_mosaic.png").exists()
    assert (out / "10253.csv").exists()


def test_listed_patch_that_is_gone_gets_a_missing_row(tmp_path):
    """A path that vanished between listing and scoring (here: listed, never there) is a row, not a crash."""
    listing = tmp_path / "list.txt"
    real = sorted(SAMPLE_PATIENT.rglob("*.png"))
    gone = SAMPLE_PATIENT / "0" / "10253_idx5_x9999_y9999_class0.png"
    listing.write_text("\n".join(str(p) for p in [*real, gone]) + "\n")
    result = run(["--from-list", listing, "--out", tmp_path / "o"])
    assert result.exit_code == 0, result.output
    rows = {r["path"].replace("\\", "/").split("/")[-1]: r for r in read_csv(tmp_path / "o" / "10253.csv")}
    assert rows[gone.name]["status"] == "missing" and rows[gone.name]["prob_idc"] == ""
    summary = read_csv(tmp_path / "o" / "summary.csv")[0]
    assert (summary["n_patches"], summary["n_scored"], summary["n_failed"]) == ("12", "11", "1")


def test_resume_without_review_removes_the_old_report_page(tmp_path):
    out = tmp_path / "out"
    assert run([SAMPLE_PATIENT, "--out", out]).exit_code == 0
    assert (out / "report.html").exists()
    (out / "10253.csv").write_text("path\nhalf")  # as if the patient had not completed
    assert run([SAMPLE_PATIENT, "--out", out, "--resume", "--no-review"]).exit_code == 0
    assert not (out / "report.html").exists() and not (out / "10253_mosaic.png").exists()


def test_corrupt_resume_state_means_scoring_again(tmp_path):
    out = tmp_path / "out"
    assert run([SAMPLE_PATIENT, "--out", out, "--no-review"]).exit_code == 0
    clean = (out / "10253.csv").read_bytes()
    for state in (out / ".idc-state").glob("*.json"):
        record = json.loads(state.read_text())
        del record["tally"]
        state.write_text(json.dumps(record))
    result = run([SAMPLE_PATIENT, "--out", out, "--resume", "--no-review"])
    assert result.exit_code == 0 and json.loads((out / "run.json").read_text())["counts"]["patients_resumed"] == 0
    assert (out / "10253.csv").read_bytes() == clean


def test_from_list_resolves_relative_paths_against_the_current_folder(tmp_path, monkeypatch):
    """A list written by `find samples -name '*.png' > lists/all.txt` holds paths relative to where it was
    made: they are found from the current folder, not from the list's folder (which gave every row missing)."""
    work = tmp_path / "work"
    shutil.copytree(SAMPLE_PATIENT, work / "samples" / "10253")
    (work / "lists").mkdir()
    lines = sorted(str(p.relative_to(work)) for p in (work / "samples").rglob("*.png"))
    (work / "lists" / "all.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(work)
    result = run(["--from-list", "lists/all.txt", "--out", tmp_path / "o", "--no-review"])
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "o" / "10253.csv")
    assert len(rows) == 11 and {r["status"] for r in rows} == {"ok"}


def test_a_folder_of_idc_reports_is_not_scored_as_a_patient(tmp_path):
    """Reports written into a cohort (idc-reports/ beside the patients) hold mosaic PNGs and .idc-state:
    a second run over the cohort must not report a patient 'idc-reports'."""
    cohort = tmp_path / "cohort"
    shutil.copytree(SAMPLE_PATIENT, cohort / "10253")
    assert run([cohort, "--out", cohort / "idc-reports"]).exit_code == 0
    assert run([cohort, "--out", tmp_path / "second"]).exit_code == 0
    ids = [r["patient_id"] for r in read_csv(tmp_path / "second" / "summary.csv")]
    assert ids == ["10253"]
    alone = run([cohort / "idc-reports", "--out", tmp_path / "third"])
    assert alone.exit_code == 2 and "no patient directories" in alone.output


def test_out_inside_a_patient_folder_is_refused(tmp_path):
    patient = tmp_path / "10253"
    shutil.copytree(SAMPLE_PATIENT, patient)
    result = run([patient, "--out", patient / "reports"])
    assert result.exit_code == 2 and "inside the folder of patient 10253" in result.output
    assert not (patient / "reports").exists()


def test_resume_rescores_a_patient_whose_files_changed(tmp_path, caplog):
    """--resume keeps a finished patient only while its file list (names, sizes, times) is the same."""
    cohort = tmp_path / "cohort"
    for pid in ("10253", "20000"):
        shutil.copytree(SAMPLE_PATIENT, cohort / pid)
    out = tmp_path / "out"
    assert run([cohort, "--out", out, "--no-review"]).exit_code == 0
    removed = sorted((cohort / "20000").rglob("*.png"))[0]
    removed.unlink()  # a patch of patient 20000 is gone; patient 10253 is untouched
    kept_csv = (out / "10253.csv").read_bytes()
    with caplog.at_level("INFO", logger="idc_infer.engine"):
        result = CliRunner().invoke(main, [str(cohort), "--out", str(out), "--no-review", "--resume"])
    assert result.exit_code == 0, result.output
    summary = {r["patient_id"]: r for r in read_csv(out / "summary.csv")}
    assert summary["20000"]["n_patches"] == "10" and summary["10253"]["n_patches"] == "11"
    assert (out / "10253.csv").read_bytes() == kept_csv
    assert any("20000" in r.message and "input files unchanged" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("change", ["mtime", "size, same mtime", "idc version", "CSV columns"])
def test_resume_rescores_a_patient_touched_rewritten_or_scored_by_another_idc(tmp_path, caplog, change, monkeypatch):
    """The fingerprint covers each file's time and size, and the idc version that wrote the state."""
    import os

    import idc_infer.engine as engine

    patient = tmp_path / "10253"
    shutil.copytree(SAMPLE_PATIENT, patient)
    out = tmp_path / "out"
    assert run([patient, "--out", out, "--no-review"]).exit_code == 0
    target = sorted(patient.rglob("*.png"))[0]
    info = target.stat()
    if change == "mtime":
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    elif change == "size, same mtime":
        target.write_bytes(target.read_bytes() + b"\0")  # a trailing byte PNG readers ignore
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    elif change == "idc version":
        monkeypatch.setattr(engine, "__version__", "9.9.9")
    else:  # a CSV written before the notice column: stale, whatever version wrote it
        monkeypatch.setattr(engine, "PATCH_COLUMNS", engine.PATCH_COLUMNS[:-1])
    with caplog.at_level("INFO", logger="idc_infer.engine"):
        result = CliRunner().invoke(main, [str(patient), "--out", str(out), "--no-review", "--resume"])
    assert result.exit_code == 0, result.output
    assert any("scoring it again" in r.getMessage() for r in caplog.records)
    assert not any("already done" in r.getMessage() for r in caplog.records)


def test_disk_full_while_writing_report_html_is_an_exit_1_message(tmp_path, monkeypatch):
    import errno

    import idc_infer.report as report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_report_html", full)
    result = CliRunner().invoke(main, [str(SAMPLE_PATIENT), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "No space left on device" in result.output and "--resume" in result.output
    assert (tmp_path / "o" / "summary.csv").exists() and (tmp_path / "o" / "run.json").exists()


def test_a_second_run_on_the_same_out_is_refused_while_the_first_writes(tmp_path):
    """Two runs into one --out would leave reports that disagree; the second is a usage error, and once
    the first is done (its lock goes with it) the folder is usable again."""
    from idc_infer.files import folder_lock

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from idc_infer.files import folder_lock\n"
                f"with folder_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = run([SAMPLE_PATIENT, "--out", out])
        assert busy.exit_code == 2 and "being written by another idc-infer run" in busy.output
        assert not (out / "summary.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run([SAMPLE_PATIENT, "--out", out]).exit_code == 0  # killed: no stale lock left behind
    with folder_lock(out):  # and this run released its own
        pass


def test_disk_full_while_writing_run_json_is_an_exit_1_message(tmp_path, monkeypatch):
    import errno

    import idc_infer.run_record as run_record

    real = run_record.write_json

    def full(target, payload):
        if target.name == "run.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, payload)

    monkeypatch.setattr(run_record, "write_json", full)
    result = CliRunner().invoke(main, [str(SAMPLE_PATIENT), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "No space left on device" in result.output and "--resume" in result.output
    assert (tmp_path / "o" / "summary.csv").exists()


def test_benign_and_malignant_folders_are_labels_not_patients(tmp_path):
    """The class-folder layout idc-train accepts (<patient>/benign|malignant/) is one labelled patient here too."""
    patient = tmp_path / "P1"
    for folder, label in (("benign", "0"), ("malignant", "1")):
        (patient / folder).mkdir(parents=True)
        for source in sorted((SAMPLE_PATIENT / label).glob("*.png")):
            # names without the Kaggle pattern: the label can only come from the folder
            shutil.copy(
                source, patient / folder / (source.name.replace("10253_idx5_", "patch_").split("_class")[0] + ".png")
            )
    assert run([patient, "--out", tmp_path / "o", "--no-review"]).exit_code == 0
    [row] = read_csv(tmp_path / "o" / "summary.csv")
    assert row["patient_id"] == "P1" and row["n_labelled"] == "11" and row["true_idc_fraction"] != ""


def test_a_patient_folder_named_like_the_cohort_row_is_refused(tmp_path):
    shutil.copytree(SAMPLE_PATIENT, tmp_path / "cohort" / "(cohort)")
    shutil.copytree(SAMPLE_PATIENT, tmp_path / "cohort" / "10253")
    result = run([tmp_path / "cohort", "--out", tmp_path / "o"])
    assert result.exit_code == 2 and "'(cohort)'" in result.output


def test_an_unreadable_sub_folder_is_warned_about_and_noted_in_the_summary(tmp_path, monkeypatch, caplog):
    import os

    patient = tmp_path / "10253"
    shutil.copytree(SAMPLE_PATIENT, patient)
    locked = patient / "1"
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level("WARNING", logger="idc_infer"):
        result = CliRunner().invoke(main, [str(patient), "--out", str(tmp_path / "o"), "--no-review"])
    assert result.exit_code == 0, result.output
    assert "cannot be read" in caplog.text and str(locked) in caplog.text
    [row] = read_csv(tmp_path / "o" / "summary.csv")
    assert row["n_patches"] == "6" and "1 sub-folder(s) could not be read" in row["notes"]


def test_an_empty_out_is_a_usage_error_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run([SAMPLE_PATIENT, "--out", ""])
    assert result.exit_code == 2 and "empty name" in result.output
    assert not (tmp_path / "summary.csv").exists()


def test_out_equal_to_the_input_cohort_is_refused(tmp_path):
    """--out data over the cohort data/ would mark data/ as a folder of reports: the next run would skip it."""
    shutil.copytree(SAMPLE_PATIENT, tmp_path / "data" / "10253")
    result = run([tmp_path / "data", "--out", tmp_path / "data"])
    assert result.exit_code == 2 and "is an input folder itself" in result.output


def test_the_progress_bar_gets_the_total_of_the_files_to_score(tmp_path):
    """The bar starts at once without a total and gets one when the files are counted (a background walk)."""
    import threading

    from tqdm import tqdm

    from idc_infer.cli import _count_in_background
    from idc_infer.discover import patients_from_dirs

    root = tmp_path / "cohort"
    write_cohort(root, n_patients=2, seed=1, grid=4)
    bar = tqdm(total=None, disable=True)
    _count_in_background(bar, patients_from_dirs([root]))
    for thread in threading.enumerate():
        if thread.name == "count-files":
            thread.join(timeout=30)
    assert bar.total == 2 * 4 * 4


def test_resume_keeps_the_skipped_files_of_kept_patients_in_run_json(tmp_path):
    root = tmp_path / "cohort"
    write_cohort(root, n_patients=2, seed=4, grid=3)
    (root / "90001" / "readme.txt").write_text("notes")
    (root / "90002" / ".hidden.png").write_bytes(b"x")
    first = run([root, "--out", tmp_path / "out", "-q"])
    assert first.exit_code == 0, first.output
    before = json.loads((tmp_path / "out" / "run.json").read_text())["counts"]
    resumed = run([root, "--out", tmp_path / "out", "--resume", "-q"])
    after = json.loads((tmp_path / "out" / "run.json").read_text())["counts"]
    assert after["patients_resumed"] == 2
    assert after["skipped_files"] == before["skipped_files"] == 2
    assert after["skipped_by_reason"] == before["skipped_by_reason"]
    assert resumed.exit_code == 0


def test_help_starts_without_opencv_numpy_tensorflow_dask_or_slide_readers():
    """`idc-infer --help` and `idc-tile --help` import click and idc's light modules only (a tenth of a second)."""
    heavy = ("cv2", "tensorflow", "dask", "distributed", "tiffslide", "onnxruntime")
    assert loaded_packages("import idc_infer.cli, idc_infer.tile\n", heavy) == []


def test_every_per_patient_csv_row_says_research_use_only(tmp_path):
    """A patient's CSV travels alone (mailed, opened in Excel): each row carries the notice, failed ones too."""
    from idc_infer.files import RESEARCH_NOTICE

    patient = tmp_path / "P1"
    shutil.copytree(SAMPLE_PATIENT, patient)
    (patient / "P1_idx5_x1_y1_class0.png").write_bytes(b"not a png")
    result = CliRunner().invoke(main, [str(patient), "--out", str(tmp_path / "o"), "--no-review"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "o" / "P1.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames[-1] == "notice"
    assert len(rows) == 12 and {row["notice"] for row in rows} == {RESEARCH_NOTICE}
    assert any(row["status"] != "ok" for row in rows)
