"""Evaluate a Keras or ONNX model on labelled patients, the way the field reports it.

Both model kinds are fed by the infer-side decoder and streaming scorer, so an exported model
is judged by the same code that runs in the lab. Writes metrics.json, report.txt,
predictions.csv (one row per patch) and plots.
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from idc_infer.contract import Contract
from idc_infer.engine import score_paths
from idc_infer.files import RESEARCH_NOTICE, atomic_path, write_csv, write_json
from idc_infer.metrics import classification_metrics, roc_auc

from .data import LEAKY_WARNING, LabelledPatch, discover_labelled, resolve_split

log = logging.getLogger(__name__)

# Published results on the Janowczyk 2016 / Cruz-Roa 2014 folds (patch level).
PUBLISHED = {
    "Cruz-Roa et al. 2014": {"f1": 0.718, "balanced_accuracy": 0.842},
    "Janowczyk & Madabhushi 2016": {"f1": 0.7648, "balanced_accuracy": 0.847},
}
EXAMPLES_PER_KIND = 8


@dataclass
class KerasScorer:
    """A Keras model behind the same two attributes score_paths uses on an ONNX model."""

    model: object
    contract: Contract

    def predict_prob_idc(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(batch, verbose=0)[:, self.contract.positive_class_index], dtype=np.float64)


def load_scorer(model_path: Path, threads: int = 2):
    """An ONNX file through idc_infer, or a .keras file with the contract of its training run."""
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        from idc_infer.model import load_model

        return load_model(model_path, threads=threads)
    import keras

    meta_file = model_path.parent / "train_meta.json"
    threshold = json.loads(meta_file.read_text())["threshold"] if meta_file.exists() else 0.5
    return KerasScorer(keras.models.load_model(model_path, compile=False), Contract(threshold=threshold))


@dataclass
class Scores:
    paths: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    darkness: list[float] = field(default_factory=list)  # 1 - mean intensity: the colour-statistics baseline
    failed: list[str] = field(default_factory=list)
    examples: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))


def score_patches(scorer, patches: list[LabelledPatch], threshold: float, batch_size: int = 128, threads: int = 2) -> Scores:
    by_path = {p.path: p for p in patches}
    scores = Scores()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for scored in score_paths(scorer, [p.path for p in patches], pool, batch_size):
            patch = by_path[scored.path]
            if scored.prob_idc is None:
                scores.failed.append(f"{scored.path}: {scored.decoded.status}")
                continue
            scores.paths.append(str(scored.path))
            scores.patient_ids.append(patch.patient_id)
            scores.labels.append(patch.label)
            scores.probs.append(scored.prob_idc)
            scores.darkness.append(1.0 - float(scored.decoded.rgb.mean()) / 255.0)
            pred = int(scored.prob_idc >= threshold)
            kind = ("T" if pred == patch.label else "F") + ("P" if pred else "N")
            if len(scores.examples[kind]) < EXAMPLES_PER_KIND:
                scores.examples[kind].append(scored.decoded.rgb)
    return scores


def per_patient_fractions(scores: Scores, threshold: float) -> list[dict]:
    groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for pid, label, prob in zip(scores.patient_ids, scores.labels, scores.probs):
        groups[pid].append((label, prob))
    rows = []
    for pid, items in sorted(groups.items()):
        labels = np.array([l for l, _ in items])
        preds = np.array([p >= threshold for _, p in items])
        rows.append({"patient_id": pid, "n": len(items), "true_idc_fraction": float(labels.mean()),
                     "predicted_idc_fraction": float(preds.mean())})
    return rows


def format_report(metrics: dict, baseline_auc: float, patients: list[dict], model_name: str, split: str,
                  set_name: str, failed: int) -> str:
    m = metrics
    lines = [
        f"idc evaluation of {model_name} on " + (f"the {set_name} set ({split} split)" if split else "all labelled patches")
        + f" -- {RESEARCH_NOTICE}",
        f"patches: {m['n']} ({m['n_idc']} IDC), not scored: {failed}; threshold {m['threshold']:.3f}",
        *([f"WARNING: {LEAKY_WARNING}"] if split == "random-patch" else []),
        "",
        "confusion matrix (rows = truth, columns = prediction)",
        "               pred non-IDC   pred IDC",
        f"  non-IDC      {m['tn']:>12}   {m['fp']:>8}",
        f"  IDC          {m['fn']:>12}   {m['tp']:>8}",
        "",
    ]
    for key, label in (("accuracy", "accuracy"), ("sensitivity", "sensitivity (IDC recall)"),
                       ("specificity", "specificity (non-IDC recall)"), ("balanced_accuracy", "balanced accuracy"),
                       ("precision", "precision (IDC)"), ("f1", "F1 (IDC)"), ("roc_auc", "ROC-AUC")):
        lines.append(f"  {label:<30} {m[key]:.4f}")
    lines.append(f"  {'baseline: darkness ROC-AUC':<30} {baseline_auc:.4f}   (1 - mean intensity; a CNN should beat it)")
    if split == "janowczyk2016" and set_name == "test":
        lines += ["", "published results on the same folds:", f"  {'':<30} {'F1':>8} {'BAC':>8}"]
        for name, ref in PUBLISHED.items():
            lines.append(f"  {name:<30} {ref['f1']:>8.4f} {ref['balanced_accuracy']:>8.4f}")
        lines.append(f"  {'this model':<30} {m['f1']:>8.4f} {m['balanced_accuracy']:>8.4f}")
    if patients:
        mae = float(np.mean([abs(p["predicted_idc_fraction"] - p["true_idc_fraction"]) for p in patients]))
        lines += ["", f"per patient IDC fraction (mean absolute error {mae:.4f})",
                  f"  {'patient':<12} {'n':>6} {'true':>8} {'predicted':>10}"]
        for p in patients:
            lines.append(f"  {p['patient_id']:<12} {p['n']:>6} {p['true_idc_fraction']:>8.3f} {p['predicted_idc_fraction']:>10.3f}")
    return "\n".join(lines) + "\n"


def evaluate(model_path: Path, data_dir: Path, out_dir: Path, split: str | None = None, set_name: str = "test",
             threshold: float | None = None, history_csv: Path | None = None, seed: int = 0,
             patches: list[LabelledPatch] | None = None) -> dict:
    """Score the chosen patients, write metrics.json, report.txt and the plots; return the metrics."""
    from . import plots

    if patches is None:  # idc-train passes the patches it already holds: no second walk of the data
        patches = discover_labelled(data_dir)
        if split is not None:
            sets, _ = resolve_split(split, patches, seed)
            patches = sets[set_name]
    if not patches:
        raise ValueError(f"no labelled patches to evaluate under {data_dir} (split {split}, set {set_name})")
    scorer = load_scorer(model_path)
    threshold = scorer.contract.threshold if threshold is None else threshold
    scores = score_patches(scorer, patches, threshold)
    metrics = classification_metrics(scores.labels, scores.probs, threshold)
    baseline_auc = roc_auc(scores.labels, scores.darkness)
    patients = per_patient_fractions(scores, threshold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = format_report(metrics, baseline_auc, patients, Path(model_path).name, split, set_name,
                           len(scores.failed))
    with atomic_path(out_dir / "report.txt") as handle:
        handle.write(report)
    mae = float(np.mean([abs(p["predicted_idc_fraction"] - p["true_idc_fraction"]) for p in patients]))
    payload = {"model": str(model_path), "data_dir": str(data_dir), "split": split, "set": set_name,
               "metrics": metrics, "baseline_darkness_roc_auc": baseline_auc, "per_patient": patients,
               "per_patient_fraction_mae": mae, "not_scored": scores.failed, "notice": RESEARCH_NOTICE}
    if split == "janowczyk2016" and set_name == "test":
        payload["published"] = PUBLISHED
    write_json(out_dir / "metrics.json", payload)
    write_csv(out_dir / "predictions.csv", ("path", "patient_id", "label", "prob_idc", "darkness"),
              [{"path": p, "patient_id": pid, "label": l, "prob_idc": prob, "darkness": dark}
               for p, pid, l, prob, dark in zip(scores.paths, scores.patient_ids, scores.labels, scores.probs,
                                                scores.darkness)])
    plots.roc_plot(out_dir / "roc.png", scores.labels, scores.probs, scores.darkness, metrics)
    plots.confusion_plot(out_dir / "confusion.png", metrics)
    plots.examples_grid(out_dir / "examples.png", scores.examples)
    history_csv = history_csv or Path(model_path).parent / "history.csv"
    if history_csv.exists():
        plots.training_curves(out_dir / "curves.png", history_csv)
    if not math.isnan(baseline_auc) and not math.isnan(metrics["roc_auc"]) and metrics["roc_auc"] <= baseline_auc:
        log.warning("the model (ROC-AUC %.3f) does not beat the darkness baseline (%.3f)", metrics["roc_auc"], baseline_auc)
    return payload
