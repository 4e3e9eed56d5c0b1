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
from typing import Any

import numpy as np

from idc_infer.contract import Contract
from idc_infer.engine import score_paths
from idc_infer.files import RESEARCH_NOTICE, atomic_path, write_csv, write_json
from idc_infer.metrics import classification_metrics, patient_bootstrap, roc_auc

from .data import (
    LEAKY_WARNING,
    LabelledPatch,
    SampleDesign,
    TrainingDataError,
    discover_labelled,
    published_split,
    read_sample_design,
    resolve_split,
)

log = logging.getLogger(__name__)

# Published results on the Janowczyk 2016 / Cruz-Roa 2014 folds (patch level).
PUBLISHED = {
    "Cruz-Roa et al. 2014": {"f1": 0.718, "balanced_accuracy": 0.842},
    "Janowczyk & Madabhushi 2016": {"f1": 0.7648, "balanced_accuracy": 0.847},
}
PUBLISHED_ON = "the Janowczyk 2016 test fold (49 patients)"
EXAMPLES_PER_KIND = 8
BOOTSTRAP_REPLICATES = 1000
INTERVAL_KEYS = ("roc_auc", "balanced_accuracy", "f1", "sensitivity", "specificity", "baseline_darkness_roc_auc")


@dataclass
class KerasScorer:
    """A Keras model behind the same two attributes score_paths uses on an ONNX model."""

    model: Any  # a keras.Model (keras ships no type information)
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
    try:  # the contract the model trained with (runs since 0.2 record it), else the defaults
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
        recorded = meta.get("contract")
        contract = Contract.from_record(recorded) if recorded else Contract(threshold=float(meta.get("threshold", 0.5)))
    except (ValueError, TypeError, AttributeError) as exc:  # a damaged train_meta.json, an invalid contract
        raise TrainingDataError(f"{meta_file} cannot be read as a training record: {exc}") from None
    try:
        model = keras.models.load_model(model_path, compile=False)
    except (ValueError, OSError) as exc:  # keras says ValueError for a file that is not a Keras model
        from idc_infer.model import ModelError

        raise ModelError(f"{model_path} is not a loadable Keras model: {str(exc).splitlines()[0][:200]}") from exc
    return KerasScorer(model, contract)


@dataclass
class Scores:
    paths: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    darkness: list[float] = field(default_factory=list)  # 1 - mean intensity: the colour-statistics baseline
    failed: list[str] = field(default_factory=list)
    examples: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))


def score_patches(
    scorer, patches: list[LabelledPatch], threshold: float, batch_size: int = 128, threads: int = 2
) -> Scores:
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
            rgb = scored.decoded.ok_rgb()
            scores.darkness.append(1.0 - float(rgb.mean()) / 255.0)
            pred = int(scored.prob_idc >= threshold)
            kind = ("T" if pred == patch.label else "F") + ("P" if pred else "N")
            if len(scores.examples[kind]) < EXAMPLES_PER_KIND:
                scores.examples[kind].append(rgb)
    return scores


def pooled_with_intervals(
    labels, probs, darkness, patient_ids, threshold: float, n_boot: int = BOOTSTRAP_REPLICATES
) -> dict:
    """Pooled metrics at ``threshold`` plus the darkness baseline, each with a 95% interval from a
    bootstrap over patients (the between-patient spread, not only patch sampling)."""
    labels, probs, darkness = np.asarray(labels), np.asarray(probs), np.asarray(darkness)

    def statistic(index):
        m = classification_metrics(labels[index], probs[index], threshold)
        return {
            **{k: m[k] for k in INTERVAL_KEYS[:-1]},
            "baseline_darkness_roc_auc": roc_auc(labels[index], darkness[index]),
        }

    metrics: dict[str, Any] = classification_metrics(labels, probs, threshold)
    metrics["baseline_darkness_roc_auc"] = roc_auc(labels, darkness)
    metrics["n_patients"] = len(set(patient_ids))
    metrics["interval_95"] = {k: list(v) for k, v in patient_bootstrap(patient_ids, statistic, n_boot).items()}
    metrics["interval_method"] = f"percentile bootstrap over patients, {n_boot} replicates"
    return metrics


def honest_metrics(scores: Scores, threshold: float, design: SampleDesign) -> dict:
    """What a reader may trust: pooled metrics over every scored patch and, where the data says
    which patches are a uniform sample of their patient, over those (an unbiased estimate of the
    pooled metrics over all patches of these patients: per-class picks over-represent one class);
    each with patient-bootstrap intervals. Whole patients' IDC fraction error where known."""
    labels, probs, darkness = np.asarray(scores.labels), np.asarray(scores.probs), np.asarray(scores.darkness)
    pids = np.asarray(scores.patient_ids)
    result = {"all_scored_patches": pooled_with_intervals(labels, probs, darkness, pids, threshold)}
    if design.uniform:
        pick = np.array([Path(p) in design.uniform for p in scores.paths], dtype=bool)
        if pick.any():
            result["uniform_sample"] = pooled_with_intervals(
                labels[pick], probs[pick], darkness[pick], pids[pick], threshold
            )
    fractions = per_patient_fractions(scores, threshold)
    whole = [row for row in fractions if row["patient_id"] in design.whole_patients]
    if whole:
        errors = [abs(r["predicted_idc_fraction"] - r["true_idc_fraction"]) for r in whole]
        result["whole_patients"] = {
            "n_patients": len(whole),
            "fraction_mae": float(np.mean(errors)),
            "fraction_max_error": float(np.max(errors)),
            "patients": whole,
        }
    return result


def _interval_text(m: dict, key: str) -> str:
    low, high = m.get("interval_95", {}).get(key, (math.nan, math.nan))
    return f"{m[key]:.4f} [{low:.3f}-{high:.3f}]"


def per_patient_fractions(scores: Scores, threshold: float) -> list[dict]:
    groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for pid, label, prob in zip(scores.patient_ids, scores.labels, scores.probs):
        groups[pid].append((label, prob))
    rows = []
    for pid, items in sorted(groups.items()):
        labels = np.array([l for l, _ in items])
        preds = np.array([p >= threshold for _, p in items])
        rows.append(
            {
                "patient_id": pid,
                "n": len(items),
                "true_idc_fraction": float(labels.mean()),
                "predicted_idc_fraction": float(preds.mean()),
            }
        )
    return rows


def format_honest(honest: dict, same_as_published: bool) -> list[str]:
    """The report's section of pooled metrics with patient-bootstrap intervals, whole-patient
    fraction errors and the published results."""
    lines = ["", "pooled metrics with 95% intervals (bootstrap over patients)"]
    sections = [("all scored patches", honest["all_scored_patches"])]
    if "uniform_sample" in honest:
        sections.insert(0, ("uniform sample of each patient (unbiased)", honest["uniform_sample"]))
    for title, m in sections:
        lines.append(f"  {title}: {m['n']} patches ({m['n_idc']} IDC) of {m['n_patients']} patients")
        for key, label in (
            ("roc_auc", "ROC-AUC"),
            ("balanced_accuracy", "balanced accuracy"),
            ("f1", "F1 (IDC)"),
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("baseline_darkness_roc_auc", "darkness baseline ROC-AUC"),
        ):
            lines.append(f"    {label:<28} {_interval_text(m, key)}")
    whole = honest.get("whole_patients")
    if whole:
        lines.append(
            f"  whole patients (every patch of the slide): IDC fraction mean absolute error "
            f"{whole['fraction_mae']:.4f}, max {whole['fraction_max_error']:.4f} over {whole['n_patients']} patients"
        )
    head = honest.get("uniform_sample", honest["all_scored_patches"])
    lines += ["", f"published results (patch level, on {PUBLISHED_ON}):", f"  {'':<30} {'F1':>8} {'BAC':>8}"]
    for name, ref in PUBLISHED.items():
        lines.append(f"  {name:<30} {ref['f1']:>8.4f} {ref['balanced_accuracy']:>8.4f}")
    lines.append(
        f"  {'this model':<30} {head['f1']:>8.4f} {head['balanced_accuracy']:>8.4f}"
        + ("" if same_as_published else "   (other patients than the published ones: for scale only, not a comparison)")
    )
    return lines


def format_report(
    metrics: dict,
    baseline_auc: float,
    patients: list[dict],
    model_name: str,
    split: str | None,
    set_name: str,
    failed: int,
    honest: dict | None = None,
    same_as_published: bool = False,
) -> str:
    m = metrics
    lines = [
        f"idc evaluation of {model_name} on "
        + (f"the {set_name} set ({split} split)" if split else "all labelled patches")
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
    for key, label in (
        ("accuracy", "accuracy"),
        ("sensitivity", "sensitivity (IDC recall)"),
        ("specificity", "specificity (non-IDC recall)"),
        ("balanced_accuracy", "balanced accuracy"),
        ("precision", "precision (IDC)"),
        ("f1", "F1 (IDC)"),
        ("roc_auc", "ROC-AUC"),
    ):
        lines.append(f"  {label:<30} {m[key]:.4f}")
    lines.append(
        f"  {'baseline: darkness ROC-AUC':<30} {baseline_auc:.4f}   (1 - mean intensity; a CNN should beat it)"
    )
    if honest:
        lines += format_honest(honest, same_as_published)
    if patients:
        mae = float(np.mean([abs(p["predicted_idc_fraction"] - p["true_idc_fraction"]) for p in patients]))
        known = any(p.get("whole_patient") is not None for p in patients)
        lines += [
            "",
            f"per patient IDC fraction (mean absolute error {mae:.4f} over all listed patients"
            + ("; only whole patients' true fraction is the slide's, the others' is the picker's)" if known else ")"),
            f"  {'patient':<12} {'n':>6} {'true':>8} {'predicted':>10}" + ("  whole" if known else ""),
        ]
        for p in patients:
            lines.append(
                f"  {p['patient_id']:<12} {p['n']:>6} {p['true_idc_fraction']:>8.3f} "
                f"{p['predicted_idc_fraction']:>10.3f}"
                + (("    yes" if p.get("whole_patient") else "     no") if known else "")
            )
    return "\n".join(lines) + "\n"


def evaluate(
    model_path: Path,
    data_dir: Path,
    out_dir: Path,
    split: str | None = None,
    set_name: str = "test",
    threshold: float | None = None,
    history_csv: Path | None = None,
    seed: int = 0,
    patches: list[LabelledPatch] | None = None,
) -> dict:
    """Score the chosen patients, write metrics.json, report.txt and the plots; return the metrics."""
    from . import plots

    if patches is None:  # idc-train passes the patches it already holds: no second walk of the data
        patches = discover_labelled(data_dir)
        if split is not None:
            sets, _ = resolve_split(split, patches, seed)
            patches = sets[set_name]
    if not patches:
        raise TrainingDataError(f"no labelled patches to evaluate under {data_dir} (split {split}, set {set_name})")
    scorer = load_scorer(model_path)
    threshold = scorer.contract.threshold if threshold is None else threshold
    scores = score_patches(scorer, patches, threshold)
    metrics = classification_metrics(scores.labels, scores.probs, threshold)
    baseline_auc = roc_auc(scores.labels, scores.darkness)
    patients = per_patient_fractions(scores, threshold)
    design = read_sample_design(data_dir)
    for row in patients:
        row["whole_patient"] = row["patient_id"] in design.whole_patients if design.whole_patients else None
    honest = honest_metrics(scores, threshold, design)
    same_as_published = set(scores.patient_ids) == {
        pid for pid, s in published_split("janowczyk2016").items() if s == "test"
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = format_report(
        metrics,
        baseline_auc,
        patients,
        Path(model_path).name,
        split,
        set_name,
        len(scores.failed),
        honest,
        same_as_published,
    )
    with atomic_path(out_dir / "report.txt") as handle:
        handle.write(report)
    mae = float(np.mean([abs(p["predicted_idc_fraction"] - p["true_idc_fraction"]) for p in patients]))
    payload: dict[str, Any] = {
        "model": str(model_path),
        "data_dir": str(data_dir),
        "split": split,
        "set": set_name,
        "metrics": metrics,
        "baseline_darkness_roc_auc": baseline_auc,
        "per_patient": patients,
        "per_patient_fraction_mae": mae,
        "not_scored": scores.failed,
        "notice": RESEARCH_NOTICE,
    }
    payload["pooled"] = honest
    payload["published"] = {"results": PUBLISHED, "on": PUBLISHED_ON, "same_patients": same_as_published}
    write_json(out_dir / "metrics.json", payload)
    write_csv(
        out_dir / "predictions.csv",
        ("path", "patient_id", "label", "prob_idc", "darkness"),
        [
            {"path": p, "patient_id": pid, "label": l, "prob_idc": prob, "darkness": dark}
            for p, pid, l, prob, dark in zip(
                scores.paths, scores.patient_ids, scores.labels, scores.probs, scores.darkness
            )
        ],
    )
    plots.roc_plot(out_dir / "roc.png", scores.labels, scores.probs, scores.darkness, metrics)
    plots.confusion_plot(out_dir / "confusion.png", metrics)
    plots.examples_grid(out_dir / "examples.png", scores.examples)
    history_csv = history_csv or Path(model_path).parent / "history.csv"
    if history_csv.exists():
        plots.training_curves(out_dir / "curves.png", history_csv)
    if not math.isnan(baseline_auc) and not math.isnan(metrics["roc_auc"]) and metrics["roc_auc"] <= baseline_auc:
        log.warning(
            "the model (ROC-AUC %.3f) does not beat the darkness baseline (%.3f)", metrics["roc_auc"], baseline_auc
        )
    return payload
