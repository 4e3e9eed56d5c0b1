"""Rebuild the model shipped in models/ from a labelled data directory, in one command.

    python scripts/build_default_model.py ../shared/data/idc-real            # the shipped starter model
    python scripts/build_default_model.py /data/IDC_regular_ps50_idx5 --split janowczyk2016-like.csv

Runs idc-train (patient-level split from --split, default models/default-split.csv, which
holds out whole patients for validation and test) then idc-export with the parity gate on the
held-out patients, and writes models/cancernet-fp32.onnx plus models/MODEL_CARD.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", type=Path, default=REPO / "models" / "default-split.csv",
                        help="patient_id,set manifest (use 'patient' for a seeded 80/10/10 patient split)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "default-model")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    train = [str(bin_dir / "idc-train"), str(args.data_dir), "--out", str(args.run_dir), "--split", str(args.split),
             "--epochs", str(args.epochs), "--seed", str(args.seed)]
    print("+", " ".join(train), flush=True)
    subprocess.run(train, check=True)

    meta = json.loads((args.run_dir / "train_meta.json").read_text())
    held_out = [args.data_dir / pid for name in ("val", "test") for pid in meta["split"][name]]
    out = args.models_dir / "cancernet-fp32.onnx"
    export = [str(bin_dir / "idc-export"), str(args.run_dir / "model.keras"), "--out", str(out)]
    for directory in held_out:
        if directory.is_dir():
            export += ["--parity-data", str(directory)]
    print("+", " ".join(export), flush=True)
    subprocess.run(export, check=True)

    card = {
        "model": out.name,
        "training_data": meta["training_data"],
        "split": meta["split"],
        "threshold": meta["threshold"],
        "metrics": meta["metrics"],
        "demo": meta["demo"],
        "export": json.loads(out.with_suffix(".export.json").read_text())["parity"],
        "intended_use": "research use only; not for diagnosis",
    }
    (args.models_dir / "MODEL_CARD.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".export.json").unlink()
    print(f"wrote {out} and {args.models_dir / 'MODEL_CARD.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
