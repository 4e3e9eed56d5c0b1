"""Patient-level k-fold cross-validation of a training recipe, pooled over out-of-fold patients.

Each fold tests on its own patients, picks the threshold on the next fold's patients
(validation) and trains on the rest, so every prediction pooled here is on a patient that
model never saw. With few patients this says more than one held-out split.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from idc_infer.files import write_csv, write_json
from idc_infer.metrics import Confusion, roc_auc

from .data import TrainingDataError, counts_by_patient, discover_labelled
from .training import TrainConfig, config_record, train

log = logging.getLogger(__name__)


def assign_folds(patient_counts: dict[str, tuple[int, int]], k: int) -> dict[str, int]:
    """Deal patients, sorted by IDC ratio, round-robin into k folds: each fold spans the ratios."""
    if k < 3:
        raise TrainingDataError("cross-validation needs at least 3 folds (test, validation, training)")
    if len(patient_counts) < k:
        raise TrainingDataError(f"{len(patient_counts)} patients cannot fill {k} folds")
    order = sorted(patient_counts, key=lambda p: (patient_counts[p][1] / max(1, sum(patient_counts[p])), p))
    return {pid: i % k for i, pid in enumerate(order)}


def fold_split(folds: dict[str, int], fold: int, k: int) -> dict[str, str]:
    val_fold = (fold + 1) % k
    return {pid: "test" if f == fold else "val" if f == val_fold else "train" for pid, f in folds.items()}


def _check_same_folds(folds_csv: Path, folds: dict[str, int]) -> None:
    if not folds_csv.exists():
        raise TrainingDataError(f"{folds_csv.parent} holds no cross-validation to resume (no folds.csv)")
    try:
        with open(folds_csv, newline="", encoding="utf-8") as handle:
            previous = {row["patient_id"]: int(row["fold"]) for row in csv.DictReader(handle)}
    except (ValueError, KeyError, TypeError) as exc:  # a hand-edited or damaged folds.csv
        raise TrainingDataError(f"{folds_csv} is not a folds file this run wrote ({exc}); start a new --out") from None
    if previous != folds:
        raise TrainingDataError(
            f"{folds_csv} assigns patients to other folds than this data and --folds give; start a new --out"
        )


def pooled_metrics(rows: list[dict]) -> dict:
    """ROC-AUC over all out-of-fold probabilities; confusion from each fold's own threshold."""
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["prob_idc"]) for r in rows])
    preds = np.array([float(r["prob_idc"]) >= float(r["threshold"]) for r in rows])
    conf = Confusion.from_labels(labels, preds)
    result = {
        "n": conf.n,
        "roc_auc": roc_auc(labels, probs),
        "balanced_accuracy": conf.balanced_accuracy,
        "sensitivity": conf.sensitivity,
        "specificity": conf.specificity,
        "f1": conf.f1,
        "accuracy": conf.accuracy,
        "tp": conf.tp,
        "fp": conf.fp,
        "tn": conf.tn,
        "fn": conf.fn,
    }
    if rows and all(r.get("darkness") not in (None, "") for r in rows):  # folds evaluated by older versions lack it
        result["baseline_darkness_roc_auc"] = roc_auc(labels, np.array([float(r["darkness"]) for r in rows]))
    return result


# What may differ between the folds of one cross-validation, or between a run and its resumption.
_PER_FOLD_KEYS = ("run_dir", "split", "resume")


def recipe_of(config: TrainConfig) -> dict:
    """The training recipe as train_meta.json records it, less what each fold sets for itself."""
    return {key: v for key, v in config_record(config).items() if key not in _PER_FOLD_KEYS}


def _finished_meta(run_dir: Path, base: TrainConfig, test_patients: set[str]) -> dict | None:
    """train_meta.json of a fold trained with this recipe on these patients, else None."""
    meta_file = run_dir / "train_meta.json"
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    # data_dir may be spelt differently (relative, absolute); folds.csv and the test patients check the data.
    recorded = {key: v for key, v in meta.get("config", {}).items() if key not in _PER_FOLD_KEYS + ("data_dir",)}
    wanted = {key: v for key, v in recipe_of(base).items() if key != "data_dir"}
    if recorded != wanted:
        changed = sorted(key for key in set(recorded) | set(wanted) if recorded.get(key) != wanted.get(key))
        raise TrainingDataError(
            f"{run_dir} was trained with a different recipe ({', '.join(changed)}); "
            "resume with the same options or start a new --out"
        )
    if set(meta.get("split", {}).get("test", ())) != test_patients:
        raise TrainingDataError(f"{run_dir} tested other patients than this fold; the data changed, start a new --out")
    return meta


def _run_fold(base: TrainConfig, fold_dir: Path, manifest: Path, test_patients: set[str], resume: bool) -> dict:
    """Train and evaluate one fold; with resume, reuse a finished fold and continue an interrupted one."""
    run_dir = fold_dir / "run"
    config = replace(base, run_dir=run_dir, split=str(manifest))
    meta = _finished_meta(run_dir, base, test_patients) if resume else None
    if meta is None:
        return train(replace(config, resume=resume and (run_dir / "checkpoints").is_dir()))
    if not (run_dir / "eval-test" / "predictions.csv").exists():  # stopped between training and evaluation
        from .evaluate import evaluate

        evaluate(run_dir / "model.keras", base.data_dir, run_dir / "eval-test", split=str(manifest), seed=base.seed)
    log.info("%s already done (train_meta.json and test predictions found): reusing it", fold_dir.name)
    return meta


def cross_validate(base: TrainConfig, k: int, out_dir: Path, resume: bool = False) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = assign_folds(counts_by_patient(discover_labelled(base.data_dir)), k)
    if resume:
        _check_same_folds(out_dir / "folds.csv", folds)
    else:  # a fresh start must not later resume into folds left by an older cross-validation
        # (train() itself removes a fold's old eval-test before it writes train_meta.json)
        for stale in out_dir.glob("fold*/run/train_meta.json"):
            stale.unlink()
    write_csv(
        out_dir / "folds.csv", ("patient_id", "fold"), [{"patient_id": p, "fold": f} for p, f in sorted(folds.items())]
    )
    pooled: list[dict] = []
    per_fold = []
    for fold in range(k):
        fold_dir = out_dir / f"fold{fold}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        manifest = fold_dir / "split-in.csv"
        write_csv(
            manifest,
            ("patient_id", "set"),
            [{"patient_id": p, "set": s} for p, s in sorted(fold_split(folds, fold, k).items())],
        )
        test_patients = {p for p, f in folds.items() if f == fold}
        log.info("fold %d/%d: test patients %s", fold + 1, k, sorted(test_patients))
        meta = _run_fold(base, fold_dir, manifest, test_patients, resume)
        with open(fold_dir / "run" / "eval-test" / "predictions.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                pooled.append({**row, "fold": fold, "threshold": meta["threshold"]})
        per_fold.append(
            {
                "fold": fold,
                "threshold": meta["threshold"],
                "best_epoch": meta["best_epoch"],
                "test": meta["metrics"].get("test"),
                "val": meta["metrics"]["val"],
            }
        )
    write_csv(
        out_dir / "oof_predictions.csv",
        ("path", "patient_id", "label", "prob_idc", "darkness", "fold", "threshold"),
        pooled,
    )
    result = {"k": k, "pooled_out_of_fold": pooled_metrics(pooled), "folds": per_fold, "recipe": recipe_of(base)}
    write_json(out_dir / "crossval.json", result)
    return result
