"""Patient-level k-fold cross-validation of a training recipe, pooled over out-of-fold patients.

Each fold tests on its own patients, picks the threshold on the next fold's patients
(validation) and trains on the rest, so every prediction pooled here is on a patient that
model never saw. With few patients this says more than one held-out split.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from idc_infer.files import write_csv, write_json
from idc_infer.metrics import Confusion, roc_auc

from .data import counts_by_patient, discover_labelled
from .training import TrainConfig, train

log = logging.getLogger(__name__)


def assign_folds(patient_counts: dict[str, tuple[int, int]], k: int) -> dict[str, int]:
    """Deal patients, sorted by IDC ratio, round-robin into k folds: each fold spans the ratios."""
    if k < 3:
        raise ValueError("cross-validation needs at least 3 folds (test, validation, training)")
    if len(patient_counts) < k:
        raise ValueError(f"{len(patient_counts)} patients cannot fill {k} folds")
    order = sorted(patient_counts, key=lambda p: (patient_counts[p][1] / max(1, sum(patient_counts[p])), p))
    return {pid: i % k for i, pid in enumerate(order)}


def fold_split(folds: dict[str, int], fold: int, k: int) -> dict[str, str]:
    val_fold = (fold + 1) % k
    return {pid: "test" if f == fold else "val" if f == val_fold else "train" for pid, f in folds.items()}


def pooled_metrics(rows: list[dict]) -> dict:
    """ROC-AUC over all out-of-fold probabilities; confusion from each fold's own threshold."""
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["prob_idc"]) for r in rows])
    preds = np.array([float(r["prob_idc"]) >= float(r["threshold"]) for r in rows])
    conf = Confusion.from_labels(labels, preds)
    return {"n": conf.n, "roc_auc": roc_auc(labels, probs), "balanced_accuracy": conf.balanced_accuracy,
            "sensitivity": conf.sensitivity, "specificity": conf.specificity, "f1": conf.f1,
            "accuracy": conf.accuracy, "tp": conf.tp, "fp": conf.fp, "tn": conf.tn, "fn": conf.fn}


def cross_validate(base: TrainConfig, k: int, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = assign_folds(counts_by_patient(discover_labelled(base.data_dir)), k)
    write_csv(out_dir / "folds.csv", ("patient_id", "fold"), [{"patient_id": p, "fold": f} for p, f in sorted(folds.items())])
    pooled: list[dict] = []
    per_fold = []
    for fold in range(k):
        fold_dir = out_dir / f"fold{fold}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        manifest = fold_dir / "split-in.csv"
        write_csv(manifest, ("patient_id", "set"), [{"patient_id": p, "set": s} for p, s in sorted(fold_split(folds, fold, k).items())])
        log.info("fold %d/%d: test patients %s", fold + 1, k, sorted(p for p, f in folds.items() if f == fold))
        meta = train(replace(base, run_dir=fold_dir / "run", split=str(manifest)))
        with open(fold_dir / "run" / "eval-test" / "predictions.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                pooled.append({**row, "fold": fold, "threshold": meta["threshold"]})
        per_fold.append({"fold": fold, "threshold": meta["threshold"], "best_epoch": meta["best_epoch"],
                         "test": meta["metrics"].get("test"), "val": meta["metrics"]["val"]})
    write_csv(out_dir / "oof_predictions.csv", ("path", "patient_id", "label", "prob_idc", "fold", "threshold"), pooled)
    result = {"k": k, "pooled_out_of_fold": pooled_metrics(pooled), "folds": per_fold,
              "recipe": {key: str(v) for key, v in base.__dict__.items()}}
    write_json(out_dir / "crossval.json", result)
    return result
