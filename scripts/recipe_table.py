"""Print the recipe table of docs/recipe.md from finished idc-train runs (one row per run directory).

    python scripts/recipe_table.py runs/recipe/*/

Each run's eval-val/metrics.json (written by idc-train; or by `idc-eval MODEL DATA --split SPLIT
--set val --out RUN/eval-val` for runs of older versions) gives the validation-fold numbers:
pooled over the uniform sample of each patient with patient-bootstrap intervals, and the counted
IDC-fraction error on whole validation patients. history.csv gives the median epoch time (epoch_s:
training, BatchNorm re-estimation and the validation pass; Keras' per-epoch line in RUN.log for
runs of older versions, training only).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path


def _cell(m: dict, key: str) -> str:
    low, high = m["interval_95"][key]
    return f"{m[key]:.3f} [{low:.3f}-{high:.3f}]"


def row(run: Path) -> str:
    meta = json.loads((run / "train_meta.json").read_text(encoding="utf-8"))
    metrics = json.loads((run / "eval-val" / "metrics.json").read_text(encoding="utf-8"))
    pooled = metrics["pooled"]
    m = pooled.get("uniform_sample") or pooled["all_scored_patches"]
    config = meta["config"]
    with open(run / "history.csv", newline="", encoding="utf-8") as handle:
        epochs = list(csv.DictReader(handle))
    times = [float(e["epoch_s"]) for e in epochs if e.get("epoch_s")]
    log = run.parent / f"{run.name}.log"  # runs of versions before epoch_s: Keras' own per-epoch line
    if not times and log.exists():
        times = [float(m) for m in re.findall(r"^\d+/\d+ - (\d+)s - ", log.read_text(errors="replace"), re.M)]
    epoch_s = f"{statistics.median(times):.0f}" if times else "n/a"
    recipe = (
        f"{config['arch']}, {config.get('optimizer', 'seed')} lr {config['learning_rate']:g}, "
        f"--augment {config['augment']}, --patient-weight {config.get('patient_weight', 'none')}, "
        f"batch {config['batch_size']}"
    )
    whole = pooled.get("whole_patients", {})
    return (
        f"| {run.name} | {recipe} | {len(epochs)} (best {meta['best_epoch']}) | {_cell(m, 'roc_auc')} | "
        f"{_cell(m, 'balanced_accuracy')} | {_cell(m, 'f1')} | {m['baseline_darkness_roc_auc']:.3f} | "
        f"{whole.get('fraction_mae', float('nan')):.3f} | {epoch_s} |"
    )


def main(argv: list[str]) -> int:
    print(
        "| run | recipe | epochs | val ROC-AUC | val balanced accuracy | val F1 | darkness ROC-AUC | "
        "whole-patient fraction MAE (counted) | s / epoch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in argv:
        print(row(Path(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
