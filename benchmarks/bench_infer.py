"""Benchmark idc-infer on a synthetic cohort; prints a markdown table (run by hand, not in CI).

    python benchmarks/bench_infer.py --data ../shared/data/idc-real --threads 2 --repeat 3
    python benchmarks/bench_infer.py --patches 100000 --batch-size 4096     # synthetic; the memory bound

One table, one run: the plain onnxruntime + cv2 loop a user would write (benchmarks/plain_loop.py, the peer),
idc-infer default and --no-review, the plain loop's own work pipelined as idc-infer runs (plain_loop.py
--pipelined: the most the pipeline alone can give), Keras seed-style where TensorFlow and a .keras model are
given, the model-only and decode-only ceilings; patches/s, the ratio to the plain loop, the CPU time each
process used (all its threads, user + system), peak RSS. Then the start-up of `idc-infer --help` and the
slide-reading figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def make_cohort(root: Path, n_patches: int) -> list[Path]:
    """Synthetic patients of 400 patches each; written once, reused between runs."""
    from idc_train.synthetic import write_cohort

    grid = 20
    n_patients = max(1, n_patches // (grid * grid))
    marker = root / f".complete-{n_patients}"
    if not marker.exists():
        write_cohort(root, n_patients=n_patients, seed=0, grid=grid)
        marker.touch()
    return sorted(root.rglob("*.png"))


# the last line a measured child prints: its own peak RSS (kB), its own CPU seconds (all threads) and those of the
# processes it started and waited for. The CPU of every process under it (idc-infer's fork server and the worker
# processes it forks, which idc-infer does not wait for) is read from /proc while it runs, where there is one
_REPORT_USAGE = (
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "waited = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print('MAXRSS', usage.ru_maxrss, usage.ru_utime + usage.ru_stime, waited.ru_utime + waited.ru_stime)"
)


def run_cli(args: list[str], memory: bool = False) -> tuple[float, float, float, float | None]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one idc-infer run: its process and the processes under it
    (a fork server and worker processes, --parallel processes) together; the RSS is the sum of each one's own
    peak (an upper bound: the peaks need not coincide, and the pages the processes share count in each)."""
    code = (
        "import resource, runpy, sys; sys.argv = ['idc-infer'] + sys.argv[1:]\n"
        "from idc_infer.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n" + _REPORT_USAGE
    )
    wall, cpu, rss, pss = _measured(code, args, memory)
    record = json.loads((Path(args[args.index("--out") + 1]) / "run.json").read_text(encoding="utf-8"))["parallel"]
    LAST_PARALLEL.clear()
    LAST_PARALLEL.update(record)
    if not _HAS_PROC and record.get("chosen") == "processes" and record.get("worker_peak_rss_mb") is not None:
        rss += record["workers"] * record["worker_peak_rss_mb"]  # no /proc: run.json's largest worker, per worker
    return wall, cpu, rss, pss


LAST_PARALLEL: dict = {}  # run.json's "parallel" of the last run_cli


def run_script(argv: list[str], memory: bool = False) -> tuple[float, float, float, float | None]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one process running a Python script (argv: the script, its
    arguments); its own figures, where RUSAGE_CHILDREN would report the largest of every child so far."""
    code = (
        "import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n" + _REPORT_USAGE
    )
    return _measured(code, argv, memory)


def _measured(code: str, args: list[str], memory: bool = False) -> tuple[float, float, float, float | None]:
    """(wall s, CPU s of the process and every process under it, the sum of their peak RSS MB, and with
    ``memory`` their peak PSS MB together, else None), read from /proc every 50 ms; without /proc, the CPU and
    RSS of the process and of those it waited for. The PSS is for separate runs, not timed ones: reading
    smaps_rollup walks each process's page tables (27 ms for idc-infer's 5 processes on a 2-vCPU AMD EPYC,
    a third of a core at this rate), which slowed the run it measured."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak_pss: list[float | None] = [None]
    below: dict[int, tuple[float, float]] = {}  # (CPU s, peak RSS MB) of each process under the child, last read

    def poll() -> None:
        while child.poll() is None:
            total = _tree_pss_kb(child.pid, below, memory)
            if total is not None and memory:
                peak_pss[0] = max(peak_pss[0] or 0.0, total / 1024)
            time.sleep(0.05)

    with ThreadPoolExecutor(1) as watcher:
        watcher.submit(poll)
        stdout, stderr = child.communicate()
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, args, stdout, stderr)
    rss_kb, own_s, waited_s = stdout.rsplit("MAXRSS", 1)[1].split()[:3]
    # the processes under it: their CPU up to the last poll (each one's last 50 ms at most is missed); without
    # /proc, those it waited for (spawned workers)
    below_s = sum(cpu for cpu, _ in below.values()) if _HAS_PROC else float(waited_s)
    below_mb = sum(rss for _, rss in below.values())
    return wall, float(own_s) + below_s, int(rss_kb) / 1024 + below_mb, peak_pss[0]


_TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


_HAS_PROC = os.path.exists("/proc/self/smaps_rollup")  # Linux


def _tree_pss_kb(pid: int, below: dict[int, tuple[float, float]] | None = None, pss: bool = True) -> int | None:
    """The proportional set size (kB) of a process and all its descendants now: shared pages counted once (0
    without ``pss``). ``below``: updated with each descendant's (CPU s so far, user + system; peak RSS MB)."""
    if not _HAS_PROC:
        return None
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            if pss:
                with open(f"/proc/{current}/smaps_rollup") as handle:
                    total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
            if below is not None and current != pid:
                with open(f"/proc/{current}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{current}/status") as handle:
                    peak_kb = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
                below[current] = ((int(fields[11]) + int(fields[12])) * _TICK_S, peak_kb / 1024)  # utime, stime
            tasks = os.listdir(f"/proc/{current}/task")
        except (OSError, StopIteration, ValueError, IndexError):
            continue  # a process that has just ended
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo += [int(c) for c in handle.read().split()]
            except (OSError, ValueError):
                continue  # a thread that has just ended
    return total


def decode_ceiling(paths: list[Path], threads: int) -> float:
    from idc_infer.contract import Contract
    from idc_infer.preprocess import decode_file

    contract = Contract()  # no quality control: the decode alone
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda p: decode_file(p, contract), paths, chunksize=64):
            pass
    return len(paths) / (time.perf_counter() - start)


def model_ceiling(model_path: Path, threads: int, batch_size: int, n: int = 20000) -> float:
    from idc_infer.model import load_model

    model = load_model(model_path, threads=threads)
    batch = np.random.default_rng(0).random((batch_size, 48, 48, 3), dtype=np.float32)
    model.predict_prob_idc(batch)
    start = time.perf_counter()
    for _ in range(n // batch_size):
        model.predict_prob_idc(batch)
    return (n // batch_size) * batch_size / (time.perf_counter() - start)


def seed_style_baseline(paths: list[Path], keras_model: Path, batch_size: int) -> float:
    """cv2.imread each file, resize, then model.predict, as the seed tutorial's predict loop."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import cv2
    import keras

    model = keras.models.load_model(keras_model, compile=False)
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        images = []
        for path in paths[i : i + batch_size]:
            image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            images.append(cv2.resize(image, (48, 48)).astype("float32") / 255.0)
        model.predict(np.stack(images), verbose=0)
    return len(paths) / (time.perf_counter() - start)


def untrained_cancernet(workdir: Path) -> Path | None:
    """A .keras CancerNet of the shipped architecture (48x48x3, 2 classes) with fresh weights, for the seed-style
    row where no trained .keras file is at hand: model.predict takes as long whatever the weights. None
    without TensorFlow."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from idc_train.architectures import build_model

    path = workdir / "cancernet-untrained.keras"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        build_model("cancernet", 48, 48, 2).save(path)
    return path


def slide_reading(slide: Path, model_path: Path, min_seconds: float = 2.0) -> tuple[float, float, int]:
    """(tissue detection s, tiles read/s at the model's scale, tiles): tiffslide read + area resize to 50 px,
    no model; the slide's tissue tiles are read again until ``min_seconds`` have passed."""
    from idc_infer.model import load_model
    from idc_infer.slides import slide_patients

    contract = load_model(model_path, threads=1).contract
    [patient] = slide_patients([slide], contract, None, None, 0.05)
    start = time.perf_counter()
    tiles = list(patient.iter_paths())
    detect = time.perf_counter() - start
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for tile in tiles:
            patient.read_tile(tile)
        n += len(tiles)
    rate = n / (time.perf_counter() - start)
    patient.finish()
    return detect, rate, len(tiles)


def help_startup_s(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "idc_infer", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a cohort root of patient folders (e.g. ../shared/data/idc-real) [default: a synthetic "
        "cohort of --patches patches]",
    )
    parser.add_argument("--patches", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", type=Path, default=None, help="ONNX model [default: the shipped one]")
    parser.add_argument(
        "--keras-model",
        type=Path,
        default=None,
        help=".keras model for the seed-style baseline [default where TensorFlow is installed: a CancerNet of "
        "the shipped architecture with untrained weights, built here (its speed is the same; its outputs are "
        "not looked at)]",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="paired runs of the plain loop, the default and --no-review; the table gives medians and the "
        "range of the ratios [default: 1]",
    )
    parser.add_argument("--baseline-patches", type=int, default=3000)
    parser.add_argument(
        "--slide",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs",
        help="slide for the reading-speed rows (needs idc[slides])",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "idc-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)  # the plain loop writes its CSV there

    from idc_infer.model import default_model_path

    model_path = args.model or default_model_path()
    if args.data is not None:
        cohort = args.data
        paths = sorted(p for p in cohort.rglob("*") if p.suffix.lower() == ".png")
    else:
        cohort = args.workdir / f"cohort-{args.patches}"
        paths = make_cohort(cohort, args.patches)
    n = len(paths)
    common = [
        "--model",
        str(model_path),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "-q",
        "--overwrite",
    ]
    plain_cmd = [
        sys.executable,
        str(Path(__file__).with_name("plain_loop.py")),
        str(cohort),
        str(model_path),
        str(args.workdir / "plain.csv"),
        "--batch-size",
        "64",
        "--threads",
        str(args.threads),
    ]
    subprocess.run(plain_cmd, check=True, capture_output=True)  # warm the page cache for every contender
    # paired runs: each repetition runs every contender back to back, so a ratio compares runs made
    # within seconds of each other on this VM, whose speed drifts by 5-10% over minutes
    threads_only = ["--parallel", "threads"]
    default_out, plain_out = ["--out", str(args.workdir / "out-default")], ["--out", str(args.workdir / "out-plain")]
    contenders: dict[str, Callable[[bool], tuple[float, float, float, float | None]]] = {  # in the order they run
        "plain": lambda memory: run_script(plain_cmd[1:], memory),
        "pipelined": lambda memory: run_script([*plain_cmd[1:], "--pipelined"], memory),
        "default": lambda memory: run_cli([str(cohort), *default_out, *common], memory),
        "no-review": lambda memory: run_cli([str(cohort), *plain_out, "--no-review", *common], memory),
        "default-threads": lambda memory: run_cli([str(cohort), *default_out, *threads_only, *common], memory),
        "no-review-threads": lambda memory: run_cli(
            [str(cohort), *plain_out, "--no-review", *threads_only, *common], memory
        ),
    }
    runs: dict[str, list[tuple[float, float, float, float | None]]] = {key: [] for key in contenders}
    for _ in range(args.repeat):
        for key, contender in contenders.items():
            runs[key].append(contender(False))
            if key == "no-review":
                chosen = dict(LAST_PARALLEL)  # what --parallel auto took
    # peak PSS in one more run of each, apart from the timed ones (reading it slows the run it measures)
    memory = {key: contender(True) for key, contender in contenders.items()}
    wall_plain = statistics.median(wall for wall, *_ in runs["plain"])
    parallel = f"--parallel auto took {chosen['chosen']} ({chosen['why']})"
    model_only = model_ceiling(model_path, args.threads, 32)
    decode_only = decode_ceiling(paths[:20000], args.threads)

    def rate_row(name: str, wall: float | None, rss: float | None, note: str = "", rate: float | None = None):
        rate = rate if rate is not None else n / wall
        ratio = rate / (n / wall_plain)
        return (name, f"{rate:,.0f}", f"{ratio:.2f}x", "", "" if rss is None else f"{rss:,.0f} MB", "", note)

    def paired_row(name: str, key: str, note: str):
        """Median rate and median ratio to the plain loop of the same repetition, with their range."""
        walls = [wall for wall, *_ in runs[key]]
        ratios = sorted(plain / wall for (plain, *_), wall in zip(runs["plain"], walls))
        ratio = f"{statistics.median(ratios):.2f}x"
        if len(ratios) > 1 and key != "plain":
            ratio += f" ({ratios[0]:.2f}-{ratios[-1]:.2f})"
            note = f"{note}; median of {len(ratios)} paired runs" if note else f"median of {len(ratios)} paired runs"
        rss = max(peak for _, _, peak, _ in [*runs[key], memory[key]])
        pss = "" if memory[key][3] is None else f"{memory[key][3]:,.0f} MB"
        cpu = statistics.median(cpu for _, cpu, *_ in runs[key])
        return (name, f"{n / statistics.median(walls):,.0f}", ratio, f"{cpu:.1f} s", f"{rss:,.0f} MB", pss, note)

    rows = [
        paired_row("plain onnxruntime + cv2 loop (benchmarks/plain_loop.py, batch 64, CSV only)", "plain", "the peer"),
        paired_row("idc-infer, default (review outputs on)", "default", f"start-up included; {parallel}"),
        paired_row("idc-infer --no-review (CSV, summary, run.json)", "no-review", f"start-up included; {parallel}"),
        paired_row("idc-infer --parallel threads", "default-threads", "review outputs on; one process"),
        paired_row("idc-infer --parallel threads --no-review", "no-review-threads", "one process"),
        paired_row(
            "plain loop's work pipelined as idc-infer runs (plain_loop.py --pipelined)",
            "pipelined",
            f"{args.threads} workers x 1 onnxruntime thread; no checks, no reports: the pipeline's ceiling",
        ),
    ]
    # every subprocess before TensorFlow is loaded here: a child forked from a process holding it starts with
    # its ~700 MB resident, which its peak RSS then reports
    startup = help_startup_s()
    slide = None
    if args.slide and args.slide.exists():
        detect, tile_rate, n_tiles = slide_reading(args.slide, model_path)
        wall_slide, _, rss_slide, _ = run_cli([str(args.slide), "--out", str(args.workdir / "out-slide"), *common])
        slide = (detect, tile_rate, n_tiles, wall_slide, rss_slide)
    keras_model, keras_note = args.keras_model, ""
    if keras_model is None:
        keras_model = untrained_cancernet(args.workdir)
        keras_note = "; CancerNet, untrained weights (speed only)"
    if keras_model is not None:
        baseline = seed_style_baseline(paths[: args.baseline_patches], keras_model, 32)
        rows.append(
            rate_row(
                "Keras model.predict, seed-style (imread per file)",
                None,
                None,
                f"{args.baseline_patches:,} patches{keras_note}",
                rate=baseline,
            )
        )
    rows.append(
        rate_row(
            "model-only ceiling (onnxruntime, pre-decoded, batch 32)",
            None,
            None,
            f"{args.threads} intra-op threads",
            rate=model_only,
        )
    )
    rows.append(
        rate_row(
            "decode-only ceiling (decode_file in threads)", None, None, f"{args.threads} threads", rate=decode_only
        )
    )

    from idc_infer.model import read_cpuinfo

    model_name, flags = read_cpuinfo()
    cpu = model_name or platform.processor() or platform.machine()
    if flags is not None:
        cpu += (
            " (" + ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) + ")"
        )
    print(
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; model "
        f"{Path(model_path).name}; --threads {args.threads}, --batch-size {args.batch_size}; {n:,} patches "
        f"({'real: ' + str(args.data) if args.data else 'synthetic'})\n"
    )
    print(
        "| run | patches/s | vs plain loop | CPU time | peak RSS | peak PSS, all processes | note |\n"
        "|---|---|---|---|---|---|---|"
    )
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        "\nCPU time: the run's process and every process under it (fork server, worker processes). Peak RSS of a "
        "run of several processes: the sum of each one's own peak (an upper bound: shared pages count in each). "
        "Peak PSS: the run's processes together, shared pages counted once, in one more run of each (reading it "
        "slows the run). All read from /proc every 50 ms."
    )
    print(f"\n`idc-infer --help` start-up: {startup:.2f} s (best of 5)")
    if slide is not None:
        detect, tile_rate, n_tiles, wall_slide, rss_slide = slide
        print(
            f"slide {args.slide.name}: tissue detection and tile list {detect * 1e3:,.0f} ms ({n_tiles} tissue tiles "
            f"at the model's scale); tile reading {tile_rate:,.0f} tiles/s on one thread; idc-infer SLIDE end to "
            f"end {wall_slide:.2f} s, {rss_slide:,.0f} MB peak"
        )


if __name__ == "__main__":
    main()
