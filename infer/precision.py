"""Which shipped file to run, fp32 or int8: by timing both on this machine, never by a CPU flag alone.

On VNNI CPUs with 2 threads int8 measured slower than fp32 (0.6-0.87x, STACK.md), so a flag says
little. ``auto`` times both files briefly at the run's thread count and keeps the faster one (int8
only when it is the faster by a margin: it costs some accuracy); the result is cached per machine,
model pair and thread count in the user's cache folder, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("auto", "fp32", "int8")
INT8_MARGIN = 1.05  # int8 must be this much faster to be chosen: it moves probabilities a little
TIMING_BATCH = 32
TIMING_S = 0.4  # per file and round; two rounds each, alternating


def cache_dir() -> Path:
    """The user's cache folder for idc (XDG on Linux, LOCALAPPDATA on Windows, ~/Library/Caches on macOS)."""
    if os.environ.get("IDC_CACHE_DIR"):
        return Path(os.environ["IDC_CACHE_DIR"])
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "idc" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "idc"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "idc"


def machine_key(fp32_sha: str, int8_sha: str, threads: int) -> str:
    from .model import read_cpuinfo

    model_name, flags = read_cpuinfo()
    text = json.dumps([model_name, sorted(flags or ()), os.cpu_count(), threads, fp32_sha, int8_sha])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def time_rates(models: dict, batch: np.ndarray, seconds: float = TIMING_S, rounds: int = 2) -> dict[str, float]:
    """Patches per second of each loaded model on ``batch``, alternating so both see the same load."""
    done = {name: 0 for name in models}
    spent = {name: 0.0 for name in models}
    for model in models.values():  # warm-up: the first runs allocate
        model.raw_prob_idc(batch)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                model.raw_prob_idc(batch)
                done[name] += len(batch)
            spent[name] += time.perf_counter() - start
    return {name: done[name] / spent[name] for name in models}


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def choose(fp32_path: Path, int8_path: Path | None, threads: int, load, measure=time_rates) -> tuple[object, dict]:
    """The model to run, loaded by ``load(path)`` (once: the timed one is kept), and a record of why (for run.json)."""
    from .files import write_json
    from .model import sha256_of

    if int8_path is None or not int8_path.is_file():
        return load(fp32_path), {"requested": "auto", "chosen": "fp32", "why": "no int8 file beside the fp32 one"}
    key = machine_key(sha256_of(fp32_path), sha256_of(int8_path), threads)
    cache_file = cache_dir() / "precision.json"
    cache = _read_cache(cache_file)
    if key in cache and cache[key].get("chosen") in ("fp32", "int8"):
        record = {**cache[key], "requested": "auto", "cached": True, "cache_file": str(cache_file)}
        return load(int8_path if record["chosen"] == "int8" else fp32_path), record
    try:
        int8_model = load(int8_path)
    except ValueError as exc:  # ModelError: a broken int8 file must not stop a run fp32 can do
        return load(fp32_path), {"requested": "auto", "chosen": "fp32", "why": f"the int8 file cannot be used: {exc}"}
    if int8_model.contract.failed_gate:
        return load(fp32_path), {"requested": "auto", "chosen": "fp32", "why": "the int8 file failed its accuracy gate"}
    models = {"fp32": load(fp32_path), "int8": int8_model}
    contract = models["fp32"].contract
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (TIMING_BATCH, contract.input_height_px, contract.input_width_px, 3))
    batch = (pixels * contract.scale + contract.offset).astype(np.float32)
    rates = measure(models, batch)
    chosen = "int8" if rates["int8"] > INT8_MARGIN * rates["fp32"] else "fp32"
    record = {
        "chosen": chosen,
        "patches_per_s": {k: round(v, 1) for k, v in rates.items()},
        "threads": threads,
        "batch": TIMING_BATCH,
        "why": f"timed both files on this machine: int8 is chosen only when over {INT8_MARGIN:g}x as fast as fp32",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:  # a cache that cannot be written (read-only home) only costs the next run the timing
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file, {**cache, key: record})
    except OSError:
        pass
    return models[chosen], {**record, "requested": "auto", "cached": False, "cache_file": str(cache_file)}
