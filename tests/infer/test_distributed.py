"""idc-infer --dask: the same reports as one machine, faults survived, resumable."""

import csv
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster, WorkerPlugin

from idc_infer.cli import main
from idc_train.synthetic import write_cohort, write_faulty_files

from ..conftest import run_outputs as outputs

pytestmark = pytest.mark.slow


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask") / "cohort"
    write_cohort(root, n_patients=4, seed=3, grid=12)
    write_faulty_files(root / "faulty")
    return root


@pytest.fixture(scope="module")
def single_machine(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    result = run([cohort, "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    return out


class DieOn(WorkerPlugin):
    """Kills the worker process (os._exit, as a crash or the OOM killer would) when it starts scoring
    ``patient_id``: the first time only, or every time."""

    def __init__(self, patient_id: str, marker: str, always: bool = False):
        self.patient_id, self.marker, self.always = patient_id, marker, always

    def setup(self, worker):
        import idc_infer.distributed as module

        original = module.score_patient

        def dying(model, patient, *args, **kwargs):
            if patient.patient_id == self.patient_id and (self.always or not os.path.exists(self.marker)):
                with open(self.marker, "a") as handle:
                    handle.write(f"{worker.address}\n")
                os._exit(1)
            return original(model, patient, *args, **kwargs)

        module.score_patient = dying


@pytest.fixture
def cluster():
    import dask

    # one task at a time per worker (saturation 1.0): a dying worker then takes only its own patient's try with
    # it, not that of a patient queued behind it (which Dask would count as a failure of that patient too)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
            yield local


def test_local_cluster_reports_are_byte_identical_to_one_machine(cohort, single_machine, tmp_path):
    out = tmp_path / "out"
    result = run([cohort, "--out", out, "--dask", "local:2", "-q"])
    assert result.exit_code == 0, result.output
    expected = outputs(single_machine)
    assert any(name.endswith("_mosaic.png") for name in expected) and any(n.endswith(".geojson") for n in expected)
    assert outputs(out) == expected
    record = json.loads((out / "run.json").read_text())["dask"]
    assert record["workers"] == 2 and record["scheduler"].startswith("tcp://")
    assert set(record["per_patient_worker"]) == {"90001", "90002", "90003", "90004", "faulty"}
    assert record["worker_failed"] == {}


def test_a_worker_killed_mid_patient_is_retried_and_every_row_arrives(cohort, single_machine, cluster, tmp_path):
    marker = tmp_path / "died"
    with Client(cluster) as client:
        client.register_plugin(DieOn("90002", str(marker)))
    result = run([cohort, "--out", tmp_path / "out", "--dask", cluster.scheduler_address, "-q"])
    assert result.exit_code == 0, result.output
    assert marker.exists()  # a worker did die scoring 90002
    assert outputs(tmp_path / "out") == outputs(single_machine)


def test_a_patient_that_kills_every_worker_gets_worker_failed_rows_and_resume_finishes_it(
    cohort, single_machine, cluster, tmp_path
):
    out = tmp_path / "out"
    with Client(cluster) as client:
        client.register_plugin(DieOn("90003", str(tmp_path / "died"), always=True))
    result = run([cohort, "--out", out, "--dask", cluster.scheduler_address, "-q", "--strict"])
    assert result.exit_code == 1  # --strict: the patient's patches could not be scored
    rows = read_csv(out / "90003.csv")
    expected_rows = read_csv(single_machine / "90003.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in expected_rows]  # every file has its row
    assert {r["status"] for r in rows} == {"worker_failed"} and all(r["prob_idc"] == "" for r in rows)
    assert "no worker could score this patient" in rows[0]["message"]
    summary = {r["patient_id"]: r for r in read_csv(out / "summary.csv")}
    assert summary["90003"]["n_failed"] == str(len(rows)) and summary["90003"]["n_scored"] == "0"
    assert read_csv(out / "90001.csv") == read_csv(single_machine / "90001.csv")  # the run went on
    run_info = json.loads((out / "run.json").read_text())
    assert "90003" in run_info["dask"]["worker_failed"]
    assert not (out / ".idc-state" / "90003.json").exists()
    # a resumed run (on a healthy cluster) scores only what is missing and ends as a clean run
    resumed = run([cohort, "--out", out, "--dask", "local:2", "--resume", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "run.json").read_text())["counts"]["patients_resumed"] == 4
    assert outputs(out) == outputs(single_machine)


def test_interrupted_cluster_run_resumes_to_a_clean_run(cohort, single_machine, tmp_path, monkeypatch):
    import idc_infer.distributed as module

    original = module.write_outcome
    written = []

    def interrupt_after_two(out_dir, stem, outcome):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C while results are coming in
        written.append(stem)
        original(out_dir, stem, outcome)

    monkeypatch.setattr(module, "write_outcome", interrupt_after_two)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(cohort), "--out", str(out), "--dask", "local:2", "-q"])
    assert result.exit_code == 130
    assert len(list((out / ".idc-state").glob("*.json"))) == 2
    monkeypatch.setattr(module, "write_outcome", original)
    resumed = run([cohort, "--out", out, "--dask", "local:2", "--resume", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "run.json").read_text())["counts"]["patients_resumed"] == 2
    assert outputs(out) == outputs(single_machine)


def test_inputs_a_worker_cannot_read_are_named_with_the_worker(tmp_path, cluster):
    patient = tmp_path / "only-here" / "90009"
    write_cohort(patient.parent, n_patients=1, seed=1, grid=3, first_id=90009)

    class HideInputs(WorkerPlugin):
        def setup(self, worker):
            import idc_infer.distributed as module

            module.Path = lambda *a: Path("/nonexistent-mount") / Path(*a).name  # this worker's view: not mounted

    with Client(cluster) as client:
        client.register_plugin(HideInputs())
    result = run([patient, "--out", tmp_path / "out", "--dask", cluster.scheduler_address, "-q"])
    assert result.exit_code == 0
    rows = read_csv(tmp_path / "out" / "90009.csv")
    assert rows and {r["status"] for r in rows} == {"worker_failed"}
    assert "cannot read" in rows[0]["message"] and "tcp://" in rows[0]["message"] and "90009" in rows[0]["message"]


def test_bad_dask_address_is_a_usage_error(tmp_path, cohort):
    result = run([cohort, "--out", tmp_path / "out", "--dask", "local:zero"])
    assert result.exit_code == 2 and "local:N" in result.output
    result = run([cohort, "--out", tmp_path / "out", "--dask", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in result.output
