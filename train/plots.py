"""Evaluation plots as PNG files: ROC curve, confusion matrix, training curves, example patches."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; lab and CI machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from idc_infer.files import atomic_path  # noqa: E402
from idc_infer.metrics import roc_curve  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(Path(path), mode="wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def roc_plot(path: Path, labels, probs, baseline_scores, metrics: dict) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fpr, tpr, _ = roc_curve(labels, probs)
    ax.plot(fpr, tpr, label=f"model (AUC {metrics['roc_auc']:.3f})")
    bfpr, btpr, _ = roc_curve(labels, baseline_scores)
    ax.plot(bfpr, btpr, "--", label="darkness baseline")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.scatter(
        [1 - metrics["specificity"]],
        [metrics["sensitivity"]],
        color="black",
        zorder=3,
        label=f"threshold {metrics['threshold']:.2f}",
    )
    ax.set_xlabel("1 - specificity (non-IDC called IDC)")
    ax.set_ylabel("sensitivity (IDC found)")
    ax.set_title("ROC, positive class = IDC")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def confusion_plot(path: Path, metrics: dict) -> None:
    matrix = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
            fontsize=12,
        )
    ax.set_xticks([0, 1], ["non-IDC", "IDC"])
    ax.set_yticks([0, 1], ["non-IDC", "IDC"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (threshold {metrics['threshold']:.2f})")
    _save(fig, path)


def training_curves(path: Path, history_csv: Path) -> None:
    with open(history_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]  # CSVLogger counts from 0
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    # val_idc_loss and val_roc_auc are measured after BatchNormalization is re-estimated, on the
    # weights that are kept; Keras' own val_loss/val_accuracy come before it, so they are a fallback
    val_loss_key = "val_idc_loss" if "val_idc_loss" in rows[0] else "val_loss"
    curves = [
        (loss_ax, "loss", "training loss"),
        (loss_ax, val_loss_key, "validation loss"),
        (acc_ax, "accuracy", "training accuracy"),
        (acc_ax, "val_roc_auc", "validation ROC-AUC"),
    ]
    if "val_roc_auc" not in rows[0]:
        curves.append((acc_ax, "val_accuracy", "validation accuracy"))
    for ax, key, label in curves:
        if key not in rows[0]:
            continue
        values = [float(r[key]) if r[key] not in (None, "") else float("nan") for r in rows]
        ax.plot(epochs, values, marker="o", markersize=3, label=label)  # markers: a 1-epoch run shows too
    loss_ax.set_xlabel("epoch")
    acc_ax.set_xlabel("epoch")
    loss_ax.set_title("loss")
    acc_ax.set_title("accuracy and validation ROC-AUC")
    loss_ax.legend()
    acc_ax.legend()
    _save(fig, path)


def examples_grid(path: Path, examples: dict[str, list[np.ndarray]]) -> None:
    """Rows of true/false positives and negatives, as the transfer-learning seed shows them."""
    kinds = [
        ("TP", "IDC, called IDC"),
        ("TN", "non-IDC, called non-IDC"),
        ("FP", "non-IDC, called IDC"),
        ("FN", "IDC, called non-IDC"),
    ]
    columns = max([len(v) for v in examples.values()] + [1])
    fig, axes = plt.subplots(len(kinds), columns, figsize=(1.1 * columns + 1.6, 1.2 * len(kinds)), squeeze=False)
    for row, (kind, title) in enumerate(kinds):
        for col in range(columns):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(examples.get(kind, [])):
                ax.imshow(examples[kind][col])
        axes[row][0].set_title(f"{kind}: {title}", fontsize=8, loc="left")
    _save(fig, path)
