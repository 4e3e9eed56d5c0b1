"""Throughput on this machine, CPU features, and the human-readable MODEL_CARD.md of an export."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from idc_infer.files import RESEARCH_NOTICE

# the CPU features that decide whether int8 kernels beat fp32 (VNNI: int8 dot products in one instruction)
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_info(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> dict:
    """CPU model and the int8-relevant flags (Linux /proc/cpuinfo; elsewhere flags are unknown)."""
    from idc_infer.model import read_cpuinfo

    model, present = read_cpuinfo(Path(cpuinfo_path))
    flags = None if present is None else {flag: flag in present for flag in INT8_CPU_FLAGS}
    return {
        "model": model or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "flags": flags,
    }


def describe_flags(info: dict) -> str:
    flags = info.get("flags")
    if flags is None:
        return "unknown (no /proc/cpuinfo)"
    present = [name for name, on in flags.items() if on]
    return ", ".join(present) if present else "none of " + ", ".join(INT8_CPU_FLAGS)


def measure_throughput(
    model_path: Path,
    batch_size: int = 32,
    threads: int = 2,
    duration_s: float = 1.0,
    input_hw: tuple[int, int] = (48, 48),
    seed: int = 0,
) -> float:
    """Patches per second of one onnxruntime session at a fixed batch size (median of three timed rounds)."""
    from idc_infer.model import cpu_session

    session = cpu_session(model_path, threads)
    name = session.get_inputs()[0].name
    batch = np.random.default_rng(seed).uniform(0, 1, (batch_size, *input_hw, 3)).astype(np.float32)
    for _ in range(3):  # first runs allocate and pick kernels
        session.run(None, {name: batch})
    rates = []
    for _ in range(3):
        n_runs, started = 0, time.perf_counter()
        while True:
            session.run(None, {name: batch})
            n_runs += 1
            elapsed = time.perf_counter() - started
            if elapsed >= duration_s / 3:
                break
        rates.append(n_runs * batch_size / elapsed)
    return float(np.median(rates))


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value != value:
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


METRIC_KEYS = (
    "n",
    "roc_auc",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "f1",
    "precision",
    "accuracy",
    "threshold",
)


def _metrics_lines(prov: dict) -> list[str]:
    """One column per patient set the training run evaluated (validation and test when both exist)."""
    sets = prov.get("all_metrics") or {prov.get("metrics_on", "held-out patients"): prov.get("metrics", {})}
    names = {"val": "validation patients", "test": "test patients", "test_at_0.5": "test patients, threshold 0.5"}
    columns = [(names.get(name, name), metrics) for name, metrics in sets.items() if metrics]
    lines = ["| metric | " + " | ".join(title for title, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in METRIC_KEYS:
        if any(key in metrics for _, metrics in columns):
            cells = [_fmt(metrics.get(key, "-"), "d" if key == "n" else ".4f") for _, metrics in columns]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _interval(m: dict, key: str) -> str:
    low, high = (m.get("interval_95") or {}).get(key, (None, None))
    if low is None:
        return _fmt(m.get(key))
    return f"{_fmt(m.get(key))} [{_fmt(low, '.3f')}–{_fmt(high, '.3f')}]"


def _validation_lines(prov: dict) -> list[str]:
    """The validation patients as idc-eval judges them: pooled metrics with patient-bootstrap intervals."""
    from idc_train.evaluate import PUBLISHED  # one table of the published results

    evaluation = prov.get("val_evaluation")
    if not evaluation:
        return []
    sets = [
        ("uniform sample of each patient (unbiased)", evaluation.get("uniform_sample")),
        ("all scored patches", evaluation.get("all_scored_patches")),
    ]
    sets = [(title, m) for title, m in sets if m]
    lines = [
        "",
        "Validation patients, pooled, with 95% intervals from a bootstrap over patients (the uniform "
        "sample estimates the pooled metrics over all patches of these patients without the per-class "
        "pickers' bias):",
        "",
        "| metric | " + " | ".join(f"{t} ({m['n']} patches, {m['n_patients']} patients)" for t, m in sets) + " |",
        "|---" * (len(sets) + 1) + "|",
    ]
    for key, label in (
        ("roc_auc", "ROC-AUC"),
        ("balanced_accuracy", "balanced accuracy"),
        ("f1", "F1"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("baseline_darkness_roc_auc", "darkness baseline ROC-AUC"),
    ):
        lines.append(f"| {label} | " + " | ".join(_interval(m, key) for _, m in sets) + " |")
    whole = evaluation.get("whole_patients")
    if whole:
        lines += [
            "",
            f"Whole validation patients ({whole['n_patients']}, every patch of the slide): counted IDC "
            f"fraction mean absolute error {_fmt(whole['fraction_mae'])}, max {_fmt(whole['fraction_max_error'])}.",
        ]
    head = sets[0][1]
    lines += [
        "",
        "Published patch-level results, on the Janowczyk 2016 **test** fold (49 patients held back from our "
        "data): other patients than the validation fold above, so for scale only, not a comparison:",
        "",
        "| | F1 | balanced accuracy |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {ref['f1']:.4f} | {ref['balanced_accuracy']:.4f} |" for name, ref in PUBLISHED.items()]
    lines.append(
        f"| this model, validation fold ({sets[0][0]}) | {_fmt(head['f1'])} | {_fmt(head['balanced_accuracy'])} |"
    )
    return lines


def _calibration_lines(report: dict) -> list[str]:
    calibrations = report.get("calibration") or {}
    if not calibrations:
        error = report.get("calibration_error")
        return ["", f"Not calibrated: {error}" if error else "Not calibrated."]
    lines = [
        "",
        "Each file has its own Platt calibration prob_idc = sigmoid(a logit(raw) + b), fitted on "
        "validation patients; the threshold is carried into calibrated space (the same calls as before).",
        "",
        "| file | a | b | fitted on | ECE before -> after | Brier before -> after | threshold | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    contracts = {"fp32": report["contract"], "int8": (report.get("quantization") or {}).get("contract")}
    for precision, fit in calibrations.items():
        rates = ((contracts.get(precision) or {}).get("quantification") or {}).get("error_rates", {})
        cal = fit["calibration"]
        lines.append(
            f"| {precision} | {cal['a']:.3f} | {cal['b']:.3f} | {cal['n_patches']} {cal['fitted_on']} | "
            f"{_fmt(fit['ece_before'])} -> {_fmt(fit['ece_after'])} | {_fmt(fit['brier_before'])} -> "
            f"{_fmt(fit['brier_after'])} | {_fmt(fit['threshold'])} | {_fmt(rates.get('sensitivity'))} "
            f"({rates.get('tp')}/{(rates.get('tp') or 0) + (rates.get('fn') or 0)}) | {_fmt(rates.get('specificity'))} "
            f"({rates.get('tn')}/{(rates.get('tn') or 0) + (rates.get('fp') or 0)}) |"
        )
    fit = calibrations.get("fp32") or next(iter(calibrations.values()))
    measured = fit["estimators"]
    lines += [
        "",
        f"ECE and Brier are in-sample (the patches the fit used). IDC-fraction estimators of the fp32 file, "
        f"{measured['method']}; the true fraction of a whole patient is its slide's, of the others the share "
        "of the patches they hold:",
        "",
        "| patients | estimator | mean abs error | max error | 95% interval coverage | mean interval width |",
        "|---|---|---|---|---|---|",
    ]
    for key, title in (
        ("whole_patients", "whole validation patients"),
        ("all_validation_patients", "all validation patients"),
    ):
        block = measured.get(key)
        if not block:
            continue
        for name in ("counted", "adjusted", "expected"):
            m = block[name]
            lines.append(
                f"| {title} ({block['n_patients']}) | {name} | {_fmt(m['mae'])} | {_fmt(m['max_error'])} | "
                f"{_fmt(m['coverage_95'], '.2f')} | {_fmt(m['mean_interval_width'], '.3f')} |"
            )
    lines += [
        "",
        f"Headline estimator (first in idc-infer's output and report.html): **{measured['headline']}** "
        f"({measured['headline_chosen_on']}).",
    ]
    colour = fit.get("colour_of_validation_patients")
    if colour:
        lines += [
            "",
            f"Colour note: idc-infer flags a patient whose mean patch colour lies more than "
            f"{colour['z_limit']:g} SD (training patients' spread, any of R, G, B) from the training patients'. "
            f"On the validation patients it flags {len(colour['flagged'])} of {len(colour['max_abs_z'])}"
            + (f" ({', '.join(colour['flagged'])})" if colour["flagged"] else "")
            + ".",
        ]
    return lines


def render_model_card(report: dict) -> str:
    """MODEL_CARD.md from an export report (pure: the same report gives the same card)."""
    contract = report["contract"]
    prov = contract.get("provenance", {})
    files = report["files"]
    lines = [
        "# CancerNet IDC patch classifier — model card",
        "",
        f"**{RESEARCH_NOTICE.upper()}.** This model scores 50x50 px H&E patches for invasive ductal carcinoma "
        "(IDC). It is a research tool; it does not screen or diagnose patients, and a pathologist reviews every output.",
        "",
    ]
    if prov.get("demo", True):
        lines += [
            "> **DEMO MODEL**: trained on synthetic or unknown data. Its outputs say nothing about real tissue.",
            "",
        ]
    lines += [
        "## Files",
        "",
        f"Throughput: onnxruntime {report['machine']['onnxruntime']}, batch {report['throughput_batch']}, "
        f"{report['throughput_threads']} thread(s), random inputs, on {report['machine']['cpu']['model']} "
        f"(int8-relevant CPU flags: {describe_flags(report['machine']['cpu'])}; 1-minute load average "
        f"{_fmt(report['machine'].get('load_average_1min'), '.2f')} while measuring: other work on the machine "
        "lowers these figures).",
        "",
        "| file | precision | status | size (MB) | throughput (patches/s) | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for precision, entry in files.items():
        lines.append(
            f"| {Path(entry['path']).name} | {precision} | {entry['status']} | {entry['size_bytes'] / 1e6:.2f} | "
            f"{_fmt(entry.get('throughput_patches_per_s'), '.0f')} | `{entry['sha256'][:16]}` |"
        )
    lines += [
        "",
        "## Input contract (stored in each file, metadata key `idc.contract`)",
        "",
        f"- input {contract['input_height_px']}x{contract['input_width_px']} px, {contract['layout']}, "
        f"{contract['channel_order']}, pixel = raw * {contract['scale']:.6g} + {contract['offset']:g}",
        f"- resize {contract['resize_method']} from native {contract['native_patch_px']} px; undersized patches: "
        f"{contract['undersized_policy']}; oversized: {contract['oversized_policy']}",
        (
            f"- scale: {contract['patch_mpp']:g} um per pixel, a {contract['native_patch_px']} px patch spans "
            f"{contract['native_patch_px'] * contract['patch_mpp']:g} um; slides are tiled at this scale"
            if contract.get("patch_mpp")
            else "- scale: not recorded (slides need idc-infer --patch-mpp)"
        ),
        f"- classes {', '.join(contract['class_names'])}; positive class {contract['class_names'][contract['positive_class_index']]}",
        f"- threshold on prob_idc: {contract['threshold']:.4f} ({prov.get('threshold_chosen_on', 'unknown')})",
        "",
        "## Training and evaluation",
        "",
        f"- training data: {prov.get('training_data', 'unknown')}",
        f"- split: {prov.get('split', 'unknown')}; patients "
        + "; ".join(f"{k}: {', '.join(v) or '-'}" for k, v in (prov.get("split_patients") or {}).items()),
        f"- trained {prov.get('trained_at')}, exported {prov.get('exported_at')}, code version {prov.get('code_version')}",
        f"- source Keras model sha256 `{prov.get('source_model_sha256', 'unknown')}`",
        "",
        "Metrics of the Keras model on patients it never trained on (patch level; the threshold was chosen "
        "on the validation patients):",
        "",
        *_metrics_lines(prov),
        *_validation_lines(prov),
        "",
        "## Calibration and IDC fractions",
        *_calibration_lines(report),
        "",
        "## Gates",
        "",
    ]
    parity = report["parity"]
    lines.append(
        f"- **fp32 parity** (Keras vs onnxruntime): max |prob diff| {parity['max_abs_diff']:.2e} on "
        f"{parity['n_inputs']} inputs (limit {parity['tolerance']:g}), {parity['label_flips']} label flip(s): passed"
    )
    quant = report.get("quantization")
    if quant is None:
        error = report.get("int8_error")
        lines.append(f"- int8: requested but could not run: {error}" if error else "- int8: not requested")
    else:
        gate = quant["gate"]
        verdict = "PASSED" if gate["passed"] else "FAILED"
        chosen = quant["chosen"]
        lines += [
            f"- **int8 accuracy gate: {verdict}** on {gate['n_patches']} patches ({gate['n_idc']} IDC) of "
            f"{quant['gate_data']['description']}, threshold {gate['threshold']:.4f}:",
            f"  ROC-AUC {_fmt(gate['fp32_roc_auc'])} (fp32) -> {_fmt(gate['int8_roc_auc'])} (int8), drop "
            f"{_fmt(gate['roc_auc_drop'])} (limit {gate['max_roc_auc_drop']}); balanced accuracy "
            f"{_fmt(gate['fp32_balanced_accuracy'])} -> {_fmt(gate['int8_balanced_accuracy'])}, drop "
            f"{_fmt(gate['balanced_accuracy_drop'])} (limit {gate['max_balanced_accuracy_drop']}); "
            f"{gate['label_flips']} label flip(s); max |prob diff| {_fmt(gate['max_abs_prob_diff'])}, "
            f"mean {_fmt(gate['mean_abs_prob_diff'])}",
        ]
        lines += [f"  - why it failed: {reason}" for reason in gate["reasons"]]
        lines += [
            f"- int8 recipe: static QDQ, int8 per-channel weights ({7 if chosen['reduce_range'] else 8}-bit range), "
            f"{chosen['activation_type']} activations, "
            f"final Dense in {'float' if chosen['float_head'] else 'int8'}, "
            f"{chosen['calibration_method']} calibration on {quant['calibration']['n_patches']} patches "
            f"({quant['calibration']['n_idc']} IDC) from {len(quant['calibration']['patients'])} patient(s): "
            f"{quant['calibration']['description']}; left in float: {', '.join(quant['nodes_left_in_float']) or 'nothing'}",
            f"- recipe chosen by {chosen['chosen_by']}:",
            "",
            "| activations | calibration | weight bits | final Dense | label flips | mean abs prob diff | max abs prob diff |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['activation_type']} | {c['calibration_method']} | {7 if c['reduce_range'] else 8} | "
            f"{'float' if c['float_head'] else 'int8'} | "
            f"{c['label_flips']} | "
            f"{_fmt(c['mean_abs_prob_diff'])} | {_fmt(c['max_abs_prob_diff'])} |"
            for c in quant["candidates"]
        ]
    lines += [
        "",
        "## Intended use",
        "",
        "- Research on H&E breast tissue patches in the layout of the public *Breast Histopathology Images* set "
        "(50x50 px patches at the same magnification and staining conditions), scored with `idc-infer` on CPUs.",
        "- Outputs are per-patch probabilities and per-patient IDC fractions for a pathologist to review.",
        "",
        "## Limits",
        "",
        "- Not a medical device; not validated for screening or diagnosis of any patient.",
        "- Patch-level metrics on few patients; patient-to-patient and stain variation beyond the training data is "
        "untested. Brightness alone separates many patches of this data set: check the model against a "
        "colour-statistics baseline before trusting it on new data.",
        "- The threshold was chosen on validation patients; a different cohort may need its own.",
        "- int8 results depend on the CPU's kernels: the gate was measured on the machine above. With 8-bit weights, CPUs "
        "with AVX2 but no VNNI can saturate intermediate sums (7-bit weights avoid that); CPUs with and without VNNI "
        "can differ slightly.",
        "",
    ]
    return "\n".join(lines)
