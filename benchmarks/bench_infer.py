"""Benchmark idc-infer on a synthetic cohort; prints a markdown table (run by hand, not in CI).

    python benchmarks/bench_infer.py --patches 100000 --threads 2 --batch-size 64

Measures: end-to-end idc-infer patches/s, the model-only ceiling (onnxruntime on pre-decoded
arrays), the decode-only ceiling (worker threads), a seed-style baseline (cv2.imread per file,
then Keras model.predict, as the tutorial does; needs TensorFlow and a .keras model), peak RSS
at two cohort sizes, and the start-up time of `idc-infer --help`.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
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


def run_cli(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one idc-infer process."""
    code = ("import resource, runpy, sys; sys.argv = ['idc-infer'] + sys.argv[1:]\n"
            "from idc_infer.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rss_kb = int(done.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    return wall, rss_kb / 1024


def decode_ceiling(paths: list[Path], threads: int) -> float:
    from idc_infer.contract import Contract
    from idc_infer.preprocess import decode_file

    contract = Contract()
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
    parser.add_argument("--patches", type=int, default=100_000)
    parser.add_argument("--small-patches", type=int, default=10_000, help="second cohort size for the flat-RSS check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", type=Path, default=None, help="ONNX model [default: the shipped one]")
    parser.add_argument("--keras-model", type=Path, default=None, help=".keras model for the seed-style baseline")
    parser.add_argument("--baseline-patches", type=int, default=3000)
    parser.add_argument("--slide", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data" /
                        "cmu_small_region.svs", help="slide for the reading-speed rows (needs idc[slides])")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "idc-bench")
    args = parser.parse_args()

    from idc_infer.model import default_model_path

    model_path = args.model or default_model_path()
    rows = []
    big = make_cohort(args.workdir / f"cohort-{args.patches}", args.patches)
    small = make_cohort(args.workdir / f"cohort-{args.small_patches}", args.small_patches)
    common = ["--model", str(model_path), "--threads", str(args.threads), "--batch-size", str(args.batch_size), "-q",
              "--overwrite"]
    wall_big, rss_big = run_cli([str(args.workdir / f"cohort-{args.patches}"), "--out", str(args.workdir / "out-big"), *common])
    wall_plain, _ = run_cli([str(args.workdir / f"cohort-{args.patches}"), "--out", str(args.workdir / "out-plain"),
                             "--no-review", *common])
    wall_small, rss_small = run_cli([str(args.workdir / f"cohort-{args.small_patches}"), "--out",
                                     str(args.workdir / "out-small"), *common])
    end_to_end = len(big) / wall_big
    model_only = model_ceiling(model_path, args.threads, args.batch_size)
    decode_only = decode_ceiling(big[:20000], args.threads)
    # decode and model share the same cores: pipelined, the best possible is the harmonic combination
    pipelined = 1.0 / (1.0 / model_only + 1.0 / decode_only)
    plain = len(big) / wall_plain
    rows.append(("idc-infer end to end, with review outputs (default)", f"{end_to_end:,.0f} patches/s",
                 f"{len(big):,} patches, incl. start-up"))
    rows.append(("idc-infer end to end, --no-review (CSV, summary, run.json)", f"{plain:,.0f} patches/s",
                 f"{len(big):,} patches, incl. start-up"))
    rows.append(("model-only ceiling (onnxruntime, pre-decoded)", f"{model_only:,.0f} patches/s", f"batch {args.batch_size}"))
    rows.append(("decode-only ceiling (cv2 in threads)", f"{decode_only:,.0f} patches/s", f"{args.threads} threads"))
    rows.append(("min(model, decode) ceiling / shared-core pipelined", f"{min(model_only, decode_only):,.0f} / {pipelined:,.0f} patches/s",
                 f"--no-review = {plain / min(model_only, decode_only):.0%} / {plain / pipelined:.0%}"))
    if args.keras_model:
        baseline = seed_style_baseline(big[: args.baseline_patches], args.keras_model, 32)
        rows.append(("seed-style baseline (imread + Keras predict)", f"{baseline:,.0f} patches/s",
                     f"idc-infer is {plain / baseline:.1f}x (--no-review), {end_to_end / baseline:.1f}x (review)"))
    if args.slide and args.slide.exists():
        detect, tile_rate, n_tiles = slide_reading(args.slide, model_path)
        wall_slide, rss_slide = run_cli([str(args.slide), "--out", str(args.workdir / "out-slide"), *common])
        rows.append(("slide: tissue detection + tile list", f"{detect * 1e3:,.0f} ms",
                     f"{args.slide.name}, {n_tiles} tissue tiles at the model's scale"))
        rows.append(("slide: tile reading (tiffslide + resize to 50 px)", f"{tile_rate:,.0f} tiles/s", "one thread"))
        rows.append(("slide: idc-infer SLIDE end to end", f"{wall_slide:.2f} s, {rss_slide:,.0f} MB peak",
                     f"{n_tiles} tiles, incl. start-up and model load"))
    rows.append(("peak RSS, with review outputs", f"{rss_small:,.0f} MB / {rss_big:,.0f} MB", f"{len(small):,} / {len(big):,} patches"))
    rows.append(("`idc-infer --help` start-up", f"{help_startup_s():.2f} s", "best of 5"))

    from idc_infer.model import read_cpuinfo

    model_name, flags = read_cpuinfo()
    cpu = model_name or platform.processor() or platform.machine()
    if flags is not None:
        cpu += " (" + ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags) + ")"
    print(f"Machine: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
          f"model {Path(model_path).name}; threads {args.threads}\n")
    print("| measure | result | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
