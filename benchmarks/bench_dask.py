"""Benchmark idc-infer --dask on this machine; prints a markdown table (run by hand, not in CI).

    python benchmarks/bench_dask.py --patches 20000 --threads 2

Measures, on one synthetic cohort of 400-patch patients: the single-machine run, --dask local:1 and
local:2 (wall time of the whole command, and patches/s with the cluster's start-up taken out), the start-up
of a LocalCluster, and the per-task overhead (many 1-patch patients through local:1, against the same
run on one machine). From these it prints the arithmetic for 10^8 patches on N machines.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import make_cohort, run_cli  # noqa: E402


def cluster_startup_s(n_workers: int) -> float:
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(n_workers)
            elapsed = time.perf_counter() - start
    return elapsed


def tiny_patients(root: Path, n: int) -> Path:
    """n patients of one patch each (copies of one synthetic patch): the cost of a task, not of scoring."""
    import shutil

    marker = root / f".complete-{n}"
    if not marker.exists():
        source = make_cohort(root / "source", 400)[0]
        for i in range(n):
            folder = root / "cohort" / f"9{i:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, folder / source.name)
        marker.touch()
    return root / "cohort"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=20_000)
    parser.add_argument("--tiny-patients", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads per worker (and one machine)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "idc-bench-dask")
    args = parser.parse_args()

    cohort_dir = args.workdir / f"cohort-{args.patches}"
    n = len(make_cohort(cohort_dir, args.patches))
    common = ["--threads", str(args.threads), "-q", "--overwrite", "--no-review"]
    single, _, _ = run_cli([str(cohort_dir), "--out", str(args.workdir / "out-single"), *common])
    rows = [("one machine (no Dask)", f"{single:.1f} s", f"{n / single:,.0f} patches/s", "")]
    startups = {}
    for workers in (1, 2):
        startups[workers] = cluster_startup_s(workers)
        wall, _, _ = run_cli(
            [str(cohort_dir), "--out", str(args.workdir / f"out-{workers}"), "--dask", f"local:{workers}", *common]
        )
        scoring = wall - startups[workers]
        rows.append(
            (
                f"--dask local:{workers}",
                f"{wall:.1f} s",
                f"{n / scoring:,.0f} patches/s",
                f"start-up {startups[workers]:.1f} s taken out; {n / scoring / (n / single):.2f}x one machine",
            )
        )
    tiny = tiny_patients(args.workdir / "tiny", args.tiny_patients)
    tiny_single, _, _ = run_cli([str(tiny), "--out", str(args.workdir / "out-tiny-single"), *common])
    tiny_dask, _, _ = run_cli([str(tiny), "--out", str(args.workdir / "out-tiny-dask"), "--dask", "local:1", *common])
    overhead = (tiny_dask - startups[1] - tiny_single) / args.tiny_patients
    rows.append(
        (
            "per-task overhead",
            f"{overhead * 1e3:.0f} ms",
            "",
            f"{args.tiny_patients} one-patch patients, local:1 against one machine",
        )
    )

    from idc_infer.model import read_cpuinfo

    model_name, _ = read_cpuinfo()
    print(
        f"Machine: {model_name or platform.processor()}, {os.cpu_count()} logical CPUs, Python "
        f"{platform.python_version()}; {n:,} patches in {n // 400} patients; --threads {args.threads}; --no-review\n"
    )
    print("| run | wall | scoring rate | note |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    rate_one = float(rows[1][2].split()[0].replace(",", ""))
    patients = 1e8 / 20_000
    print(
        f"\n10^8 patches (5,000 slides of ~20k tiles): one worker at {rate_one:,.0f} patches/s needs "
        f"{1e8 / rate_one / 3600:,.1f} h; each of N such machines adds one worker, so N machines need "
        f"{1e8 / rate_one / 3600:,.1f} / N h, plus {patients:,.0f} tasks x {overhead * 1e3:.0f} ms overhead "
        f"spread over the N workers ({patients * overhead / 3600:.2f} h / N)"
    )


if __name__ == "__main__":
    main()
