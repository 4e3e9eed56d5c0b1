"""fp32 vs int8 on this CPU: file size, onnxruntime throughput at b1/b8/b32, accuracy deltas on held-out patients.

    python benchmarks/bench_precision.py runs/default-model/export        # what build_default_model.py exported
    python benchmarks/bench_precision.py runs/export --data ../shared/data/idc-real --threads 2

Reads cancernet-fp32.onnx and cancernet-int8.onnx (or cancernet-int8.rejected.onnx) from the
export directory. Held-out patients default to the validation and test patients recorded in
the model's contract. Prints markdown; run it by hand on an idle machine (other load lowers
the throughput figures, and the table says how loaded the machine was).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZES = (1, 8, 32)


def pick_files(export_dir: Path) -> dict[str, Path]:
    files = {"fp32": export_dir / "cancernet-fp32.onnx"}
    for name in ("cancernet-int8.onnx", "cancernet-int8.rejected.onnx"):
        if (export_dir / name).is_file():
            files["int8"] = export_dir / name
            break
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing or "int8" not in files:
        raise SystemExit(
            f"bench_precision: need cancernet-fp32.onnx and an int8 file in {export_dir}; missing {missing or 'int8'}"
        )
    return files


def held_out_patches(data_dir: Path, contract, patients: list[str] | None):
    from idc_train.data import discover_labelled

    split = contract.provenance.get("split_patients") or {}
    wanted = set(patients or [*split.get("val", []), *split.get("test", [])])
    train = set(split.get("train", []))
    if not wanted:
        raise SystemExit("bench_precision: the contract names no held-out patients; pass --patients")
    if wanted & train:
        print(f"bench_precision: WARNING patients {sorted(wanted & train)} were used for training", file=sys.stderr)
    return [p for p in discover_labelled(data_dir) if p.patient_id in wanted], sorted(wanted)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data" / "idc-real",
        help="labelled data holding the held-out patients",
    )
    parser.add_argument(
        "--patients", nargs="*", help="held-out patient ids [default: val+test of the contract's split]"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per file and batch size")
    args = parser.parse_args()

    import onnxruntime

    from idc_export.card import INT8_CPU_FLAGS, cpu_info, measure_throughput
    from idc_export.quantize import accuracy_gate, decode_patch_set, file_prob_idc
    from idc_infer.model import load_model

    files = pick_files(args.export_dir)
    models = {name: load_model(path) for name, path in files.items()}
    contract = models["fp32"].contract
    cpu = cpu_info()
    flags = cpu["flags"] or {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(
        f"CPU: {cpu['model']}, {cpu['logical_cores']} logical cores; "
        + ", ".join(f"{flag} {'yes' if flags.get(flag) else 'no'}" for flag in INT8_CPU_FLAGS)
        + ("" if cpu["flags"] is not None else " (flags unknown: no /proc/cpuinfo)")
    )
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), 1-minute load average {load:.2f}\n")

    print("| file | precision | size (MB) | " + " | ".join(f"b{b} patches/s" for b in BATCH_SIZES) + " |")
    print("|---|---|---|" + "---|" * len(BATCH_SIZES))
    for name, path in files.items():
        rates = [measure_throughput(path, b, args.threads, args.seconds) for b in BATCH_SIZES]
        print(
            f"| {path.name} | {name} | {path.stat().st_size / 1e6:.2f} | "
            + " | ".join(f"{r:.0f}" for r in rates)
            + " |"
        )

    if not args.data.is_dir():
        print(f"\n(no accuracy deltas: {args.data} not found)")
        return 0
    patches, patients = held_out_patches(args.data, contract, args.patients)
    if not patches:
        print(f"\n(no accuracy deltas: none of patients {patients} in {args.data})")
        return 0
    held = decode_patch_set(patches, contract, f"patients {', '.join(patients)} of {args.data}")
    probs = {name: file_prob_idc(path, held.tensors, contract.positive_class_index) for name, path in files.items()}
    gate = accuracy_gate(held.labels, probs["fp32"], probs["int8"], contract.threshold).numbers
    print(
        f"\nAccuracy on {len(held)} patches ({gate['n_idc']} IDC) of held-out {held.description}, "
        f"threshold {contract.threshold:.4f}:\n"
    )
    print("| metric | fp32 | int8 | drop (fp32 - int8) | limit |")
    print("|---|---|---|---|---|")
    print(
        f"| ROC-AUC | {gate['fp32_roc_auc']:.4f} | {gate['int8_roc_auc']:.4f} | {gate['roc_auc_drop']:+.4f} | "
        f"{gate['max_roc_auc_drop']} |"
    )
    print(
        f"| balanced accuracy | {gate['fp32_balanced_accuracy']:.4f} | {gate['int8_balanced_accuracy']:.4f} | "
        f"{gate['balanced_accuracy_drop']:+.4f} | {gate['max_balanced_accuracy_drop']} |"
    )
    print(
        f"\nlabel flips {gate['label_flips']} of {len(held)}; |prob diff| max {gate['max_abs_prob_diff']:.4f}, "
        f"mean {gate['mean_abs_prob_diff']:.4f}"
    )
    export = models["int8"].contract.provenance.get("export", {})
    print(
        f"int8 recipe: {export.get('activation_type')} activations, {export.get('calibration_method')} calibration, "
        f"{'7' if export.get('reduce_range') else '8'}-bit weights; "
        f"gate {models['int8'].contract.provenance.get('quantization_gate')}"
    )
    if np.isnan(gate["roc_auc_drop"]):
        print("(ROC-AUC undefined: the held-out patches hold one class only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
