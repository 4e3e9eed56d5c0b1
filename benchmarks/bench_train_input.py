"""Training input throughput: idc's tf.data pipeline vs a seed-style on-the-fly loader.

    python benchmarks/bench_train_input.py --patches 20000 --epochs 3

The seed tutorial fed Keras with ImageDataGenerator.flow_from_directory: every epoch reads,
decodes, resizes and augments each file in Python. idc decodes once into a cache, then
shuffles, augments and prefetches in parallel inside tf.data. Both loops only consume the
batches (no model), so the table shows patches/s the input side can feed. Prints markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def seed_style_batches(
    paths: list[str], labels: list[int], batch_size: int, rng: np.random.Generator, flips: bool = True
):
    """As flow_from_directory: load_img(target_size) per file, random flips, every epoch."""
    from keras.utils import img_to_array, load_img

    order = rng.permutation(len(paths))
    for start in range(0, len(order), batch_size):
        images = []
        for i in order[start : start + batch_size]:
            image = img_to_array(load_img(paths[i], target_size=(48, 48))) / 255.0
            if flips and rng.random() < 0.5:
                image = image[:, ::-1]
            if flips and rng.random() < 0.5:
                image = image[::-1]
            images.append(image)
        yield np.stack(images), np.eye(2)[[labels[i] for i in order[start : start + batch_size]]]


def measure(epochs: int, make_epoch) -> list[float]:
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for images, _ in make_epoch():
            n += len(images)
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "idc-bench-train")
    args = parser.parse_args()

    from idc_infer.contract import Contract
    from idc_train.data import discover_labelled
    from idc_train.pipeline import make_dataset
    from idc_train.synthetic import write_cohort

    root = args.workdir / f"cohort-{args.patches}"
    if not (root / ".complete").exists():
        write_cohort(root, n_patients=max(1, args.patches // 400), seed=0, grid=20)
        (root / ".complete").touch()
    patches = discover_labelled(root)
    paths, labels = [str(p.path) for p in patches], [p.label for p in patches]

    rows = []
    for mode in ("idc", "seed", "none"):
        dataset = make_dataset(paths, labels, Contract(), args.batch_size, shuffle=True, augment_images=mode)
        rates = measure(args.epochs, lambda dataset=dataset: dataset.as_numpy_iterator())
        rows.append((f"idc tf.data, --augment {mode} (decode once, cache, parallel map, prefetch)", rates))
    rng = np.random.default_rng(0)
    seed = measure(args.epochs, lambda: seed_style_batches(paths, labels, args.batch_size, rng))
    rows.append(("seed-style on-the-fly (load_img per file per epoch, flips)", seed))
    bare = measure(args.epochs, lambda: seed_style_batches(paths, labels, args.batch_size, rng, flips=False))
    rows.append(("seed-style on-the-fly, no augmentation", bare))

    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
        f"{len(paths):,} synthetic patches, batch {args.batch_size}\n"
    )
    print("| loader | epoch 1 | later epochs (mean) |\n|---|---|---|")
    for name, rates in rows:
        print(f"| {name} | {rates[0]:,.0f}/s | {np.mean(rates[1:]):,.0f}/s |")


if __name__ == "__main__":
    main()
