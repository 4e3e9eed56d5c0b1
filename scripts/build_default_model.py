"""Rebuild the model shipped in models/ from a labelled data directory, in one command.

    python scripts/build_default_model.py ../shared/data/idc-real            # the shipped starter model
    python scripts/build_default_model.py /data/IDC_regular_ps50_idx5 --split janowczyk2016-like.csv

Runs idc-train (patient-level split from --split, default models/default-split.csv, which
holds out whole patients for validation and test) then idc-export --int8 into RUN_DIR/export
(parity gate on the held-out patients; int8 calibrated on training patients and gated on the
validation patients), and copies into models/: cancernet-fp32.onnx, cancernet-int8.onnx (only
if it passed its accuracy gate), export-report.json and MODEL_CARD.md. Exits 3 when int8 failed
its gate (fp32 still shipped), like idc-export.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_INT8_GATE = 3  # idc-export: fp32 written, int8 failed its accuracy gate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", type=Path, default=REPO / "models" / "default-split.csv",
                        help="patient_id,set manifest (use 'patient' for a seeded 80/10/10 patient split)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "default-model")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--export-only", action="store_true",
                        help="skip training: export the model already in --run-dir (e.g. after idc-train --resume)")
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    if args.export_only:
        return export_and_ship(args.run_dir, args.models_dir, bin_dir)
    train = [str(bin_dir / "idc-train"), str(args.data_dir), "--out", str(args.run_dir), "--split", str(args.split),
             "--epochs", str(args.epochs), "--seed", str(args.seed)]
    print("+", " ".join(train), flush=True)
    subprocess.run(train, check=True)
    return export_and_ship(args.run_dir, args.models_dir, bin_dir)


def export_and_ship(run_dir: Path, models_dir: Path, bin_dir: Path) -> int:
    """idc-export --int8 into RUN_DIR/export; copy only files that passed their gates into models/."""
    export_dir = run_dir / "export"
    export = [str(bin_dir / "idc-export"), str(run_dir / "model.keras"), "--out", str(export_dir), "--int8",
              "--bench-threads", "2"]
    print("+", " ".join(export), flush=True)
    status = subprocess.run(export).returncode
    if status not in (0, EXIT_INT8_GATE):
        return status
    report = json.loads((export_dir / "export-report.json").read_text())
    shipped = ["cancernet-fp32.onnx", "export-report.json", "MODEL_CARD.md"]
    if report["int8_usable"]:
        shipped.append("cancernet-int8.onnx")
    else:
        print("int8 failed its accuracy gate: shipping fp32 only (see MODEL_CARD.md)", file=sys.stderr)
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in ("cancernet-int8.onnx", "MODEL_CARD.json"):  # stale files of an earlier build
        if name not in shipped and (models_dir / name).exists():
            (models_dir / name).unlink()
    for name in shipped:
        tmp = models_dir / f".{name}.tmp"
        shutil.copyfile(export_dir / name, tmp)
        os.replace(tmp, models_dir / name)
    print(f"wrote {', '.join(shipped)} into {models_dir}")
    return 0 if report["int8_usable"] else EXIT_INT8_GATE  # fp32 shipped; scripts can tell int8 is missing


if __name__ == "__main__":
    sys.exit(main())
