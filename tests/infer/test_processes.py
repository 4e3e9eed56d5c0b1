"""idc-infer --parallel processes: the bytes of a threaded run, resumable, and auto picks it only where it pays."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from idc_infer.cli import main
from idc_infer.discover import Patient
from idc_infer.engine import RunSettings
from idc_infer.model import load_model
from idc_infer.processes import WorkerProcessError, plan, run_patients_parallel
from idc_train.synthetic import write_cohort, write_faulty_files

from ..conftest import run_outputs as outputs


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("processes") / "cohort"
    write_cohort(root, n_patients=5, seed=5, grid=10)
    write_faulty_files(root / "faulty")
    (root / "empty" / "0").mkdir(parents=True)  # a patient folder with no patches: its empty CSV and warning
    return root


@pytest.fixture(scope="module")
def threaded(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("threaded") / "out"
    result = run([cohort, "--out", out, "-q", "--parallel", "threads", "--threads", "2"])
    assert result.exit_code == 0, result.output
    return out


def test_worker_processes_write_the_bytes_of_a_threaded_run(cohort, threaded, tmp_path):
    """Every CSV, mosaic, GeoJSON, resume state and summary.csv, faulty files' rows included."""
    out = tmp_path / "out"
    result = run([cohort, "--out", out, "-q", "--parallel", "processes", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert outputs(out) == outputs(threaded)
    assert len([name for name in outputs(out) if name.endswith("_mosaic.png")]) == 5
    assert "empty.csv" in outputs(out) and "faulty.csv" in outputs(out)
    record = json.loads((out / "run.json").read_text())
    assert record["parallel"]["chosen"] == "processes" and record["parallel"]["workers"] == 2
    assert json.loads((threaded / "run.json").read_text())["parallel"]["chosen"] == "threads"
    assert record["counts"] == json.loads((threaded / "run.json").read_text())["counts"]


def test_spawned_workers_write_the_same_bytes_as_forked_ones(cohort, threaded, tmp_path, monkeypatch):
    """Where no fork server is used (macOS, Windows) the workers are spawned: the same outputs."""
    monkeypatch.setattr("idc_infer.forkserver.uses_fork_server", lambda: False)
    out = tmp_path / "out"
    result = run([cohort, "--out", out, "-q", "--parallel", "processes", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert outputs(out) == outputs(threaded)
    assert json.loads((out / "run.json").read_text())["parallel"]["workers"] == 2


def _live_processes_of_group(group: int) -> list[int]:
    """The processes of a process group that still run (zombies, which an init that does not reap leaves, are
    ended)."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            live.append(int(entry))
    return live


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the processes from /proc")
def test_killing_idc_infer_ends_its_workers_and_fork_server(tmp_path, demo_onnx):
    """kill -9 of idc-infer mid-run (out of memory, a scheduler's limit): no worker goes on writing into --out
    without the folder's lock, and no process of the run is left behind."""
    cohort = tmp_path / "cohort"
    write_cohort(cohort, n_patients=16, seed=4, grid=12)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "idc_infer", str(cohort), "--model", str(demo_onnx), "-q", "--batch-size", "8"]
    command += ["--parallel", "processes", "--threads", "2", "--out", str(out)]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("*.csv")):
        time.sleep(0.01)
    if child.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast for this cohort)")
    assert len(_live_processes_of_group(child.pid)) >= 3  # idc-infer, its workers (and the fork server)
    child.kill()
    child.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _live_processes_of_group(child.pid):
        time.sleep(0.05)
    assert _live_processes_of_group(child.pid) == []
    written = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    time.sleep(0.5)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == written  # nothing writes there any more


def test_resume_in_processes_rescores_only_what_changed(cohort, threaded, tmp_path):
    out = tmp_path / "out"
    in_processes = ["-q", "--parallel", "processes", "--threads", "2"]
    assert run([cohort, "--out", out, *in_processes]).exit_code == 0
    stale = sorted(out.glob("*.csv"))[0]
    stale.write_text("edited by hand\n")
    result = run([cohort, "--out", out, *in_processes, "--resume"])
    assert result.exit_code == 0, result.output
    assert outputs(out) == outputs(threaded)
    record = json.loads((out / "run.json").read_text())
    assert record["counts"]["patients_resumed"] == 6  # 7 patients, 1 redone
    assert record["parallel"]["chosen"] == "processes" and record["parallel"]["workers"] == 1  # one to redo
    assert run([cohort, "--out", out, *in_processes, "--resume"]).exit_code == 0  # nothing left: no workers
    assert json.loads((out / "run.json").read_text())["parallel"]["why"] == "no patient left to score"


def _patients(root: Path, sizes: list[int]) -> list[Patient]:
    patients = []
    for n, size in enumerate(sizes):
        folder = root / f"P{n}"
        folder.mkdir(parents=True)
        for i in range(size):
            (folder / f"P{n}_idx5_x{50 * i}_y0_class0.png").write_bytes(b"")
        patients.append(Patient(f"P{n}", folder))
    return patients


def test_auto_takes_processes_only_for_a_cohort_that_shares_out_evenly(tmp_path, monkeypatch):
    monkeypatch.setattr("idc_infer.processes.MIN_PATCHES_PER_PROCESS", 10)
    even = _patients(tmp_path / "even", [30, 20, 25, 15])
    chosen = plan("auto", 2, even, [0, 1, 2, 3])
    assert chosen.mode == "processes" and chosen.sizes == {0: 30, 1: 20, 2: 25, 3: 15}
    assert plan("auto", 4, even, [0, 1, 2, 3]).mode == "threads"  # 30 patches is more than a quarter of 90
    one_big = _patients(tmp_path / "skewed", [200, 10, 10, 10])
    skewed = plan("auto", 2, one_big, [0, 1, 2, 3])
    assert skewed.mode == "threads" and "200 of the 230 patches" in skewed.why
    assert plan("processes", 2, one_big, [0, 1, 2, 3]).mode == "processes"  # asked for: taken
    assert plan("auto", 2, even, [0]).mode == "threads"  # one patient: its batches shared out instead
    assert plan("auto", 1, even, [0, 1, 2, 3]).mode == "threads"
    assert plan("threads", 2, even, [0, 1, 2, 3]).mode == "threads"
    monkeypatch.setattr("idc_infer.processes.MIN_PATCHES_PER_PROCESS", 1000)
    small = plan("auto", 2, even, [0, 1, 2, 3])
    assert small.mode == "threads" and "too few" in small.why


def test_a_worker_that_cannot_start_is_an_error_naming_the_cause_and_leaves_no_temp_file(cohort, tmp_path, capfd):
    """A model file that changed after idc-infer loaded it: the workers refuse it, the run stops with a message
    (no traceback from the workers on stderr)."""
    from idc_infer.model import shipped_model_path

    model = load_model(shipped_model_path("fp32"), threads=1, spin=False)
    changed = dataclasses.replace(model, sha256="0" * 64)
    settings = RunSettings(tmp_path / "out", model.contract.threshold, threads=2)
    patients = [Patient(p.name, p) for p in sorted(cohort.iterdir()) if p.is_dir()]
    with pytest.raises(WorkerProcessError, match="changed while idc-infer was starting"):
        run_patients_parallel(changed, patients, settings, "processes")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT to a child process")
def test_sigint_stops_the_workers_and_resume_gives_the_bytes_of_a_clean_run(tmp_path, demo_onnx):
    cohort = tmp_path / "cohort"
    write_cohort(cohort, n_patients=16, seed=4, grid=12)
    command = [sys.executable, "-m", "idc_infer", str(cohort), "--model", str(demo_onnx), "-q", "--batch-size", "8"]
    command += ["--parallel", "processes", "--threads", "2"]
    clean = subprocess.run(command + ["--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "interrupted"
    child = subprocess.Popen(
        command + ["--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, as a shell's job: Ctrl-C reaches the workers too
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("*.csv")):
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    if child.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived (machine too fast for this cohort)")
    assert child.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # the stopped workers' half files: gone
    assert "summary.csv" not in [p.name for p in out.iterdir()]
    states = {p.stem for p in (out / ".idc-state").glob("*.json")}
    for name in states:  # a patient with a resume state is complete
        assert (out / f"{name}.csv").read_bytes() == (tmp_path / "clean" / f"{name}.csv").read_bytes()
    resumed = subprocess.run(command + ["--out", str(out), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert outputs(out) == outputs(tmp_path / "clean")


def test_worker_processes_are_at_most_one_a_core(cohort, threaded, tmp_path, monkeypatch):
    """--threads 8 on 2 cores: 2 worker processes (each more would only hold memory); on 1 core, threads."""
    monkeypatch.setattr("idc_infer.processes._cores", lambda: 2)
    out = tmp_path / "out"
    assert run([cohort, "--out", out, "-q", "--parallel", "processes", "--threads", "8"]).exit_code == 0
    assert json.loads((out / "run.json").read_text())["parallel"]["workers"] == 2
    assert outputs(out) == outputs(threaded)
    monkeypatch.setattr("idc_infer.processes._cores", lambda: 1)
    result = run([cohort, "--out", out, "-q", "--parallel", "processes", "--threads", "8", "--overwrite"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())["parallel"]
    assert (record["chosen"], record["why"], record["workers"]) == ("threads", "one worker", 8)
