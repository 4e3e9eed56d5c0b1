"""Rebuild the model shipped in models/ from a labelled data directory, in one command.

    python scripts/build_default_model.py ../shared/data/idc-real            # the shipped model
    python scripts/build_default_model.py /data/IDC_regular_ps50_idx5        # the full public set

Runs idc-train with the shipped recipe (RECIPE below, chosen on the validation fold: see
docs/recipe.md) on the split of --split (default models/default-split.csv: the Janowczyk 2016
folds, the train fold plus the patients outside the folds to train, the val fold to validate,
the test fold held out), then idc-export --int8 into RUN_DIR/export (parity gate on the held-out
patients; int8 calibrated on training patients and gated on the validation patients; each file
calibrated on the validation patients), and copies into models/: cancernet-fp32.onnx,
cancernet-int8.onnx (only if it passed its accuracy gate), export-report.json and MODEL_CARD.md.
Then rewrites the README's block of shipped-model numbers from export-report.json. Exits 3 when
int8 failed its gate (fp32 still shipped), like idc-export.
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
# The shipped recipe (docs/recipe.md says why): idc-train options beside data, split, epochs and seed.
RECIPE = {
    "--arch": "cancernet",
    "--optimizer": "adam-cosine",
    "--augment": "idc",
    "--patient-weight": "none",
    "--batch-size": "32",
    "--patience": "10",
}
README_START, README_END = "<!-- shipped-model:start -->", "<!-- shipped-model:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument(
        "--split",
        type=Path,
        default=REPO / "models" / "default-split.csv",
        help="patient_id,set manifest (use 'patient' for a seeded 80/10/10 patient split)",
    )
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "default-model")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--readme",
        type=Path,
        default=REPO / "README.md",
        help="README whose shipped-model block is rewritten (only when --models-dir is models/)",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted training run in --run-dir")
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="skip training: export the model already in --run-dir (e.g. after idc-train --resume)",
    )
    parser.add_argument(
        "--stamp-scale",
        action="store_true",
        help="no training or export: write the public set's patch scale (patch_mpp, contract schema 3) "
        "into the shipped files' contracts, and the new sha256 into the report, card and README",
    )
    parser.add_argument(
        "--optimize-graph",
        action="store_true",
        help="no training or export: apply export/graph.py's CPU rewrites to the shipped files (outputs "
        "checked bit-identical), and write the new sha256 into the report, card and README",
    )
    args = parser.parse_args()
    if args.stamp_scale:
        return stamp_scale(args.models_dir, args.readme)
    if args.optimize_graph:
        return optimize_graph(args.models_dir, args.readme)

    bin_dir = Path(sys.executable).parent
    if not args.export_only:
        train = [
            str(bin_dir / "idc-train"),
            str(args.data_dir),
            "--out",
            str(args.run_dir),
            "--split",
            str(args.split),
            "--epochs",
            str(args.epochs),
            "--seed",
            str(args.seed),
            *[item for pair in RECIPE.items() for item in pair],
            *(["--resume"] if args.resume else []),
        ]
        print("+", " ".join(train), flush=True)
        subprocess.run(train, check=True)
    status = export_and_ship(args.run_dir, args.models_dir, bin_dir)
    if status in (0, EXIT_INT8_GATE) and args.models_dir.resolve() == (REPO / "models").resolve():
        report = json.loads((args.models_dir / "export-report.json").read_text(encoding="utf-8"))
        update_readme(args.readme, readme_block(report))
        print(f"updated the shipped-model numbers in {args.readme}")
    return status


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def readme_block(report: dict) -> str:
    """The README's shipped-model numbers, from the export report (and the contract inside it)."""
    prov = report["contract"]["provenance"]
    evaluation = prov.get("val_evaluation") or {}
    lines = [
        "| validation fold, pooled | patches (patients) | ROC-AUC | balanced accuracy | F1 | sensitivity | "
        "specificity | darkness baseline ROC-AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, title in (("uniform_sample", "uniform sample (unbiased)"), ("all_scored_patches", "all patches")):
        m = evaluation.get(key)
        if not m:
            continue
        cells = []
        for metric in ("roc_auc", "balanced_accuracy", "f1", "sensitivity", "specificity", "baseline_darkness_roc_auc"):
            low, high = m["interval_95"][metric]
            cells.append(f"{_fmt(m[metric])} [{_fmt(low)}-{_fmt(high)}]")
        lines.append(f"| {title} | {m['n']:,} ({m['n_patients']}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Threshold {report['contract']['threshold']:.3f} on the calibrated prob_idc (chosen on the "
        "validation patients); 95% intervals from a bootstrap over patients."
    )
    fit = (report.get("calibration") or {}).get("fp32")
    if fit:
        est = fit["estimators"]
        lines += [
            "",
            "IDC fraction per whole patient of the validation fold (leave one patient out; mean absolute "
            "error against the slide's true fraction, and how often the 95% interval held it):",
            "",
            "| estimator | mean abs error | max error | 95% interval coverage |",
            "|---|---|---|---|",
        ]
        block = est.get("whole_patients") or est["all_validation_patients"]
        for name in ("counted", "adjusted", "expected"):
            m = block[name]
            lines.append(
                f"| {name}{' (headline)' if name == est['headline'] else ''} | {_fmt(m['mae'])} | "
                f"{_fmt(m['max_error'])} | {_fmt(m['coverage_95'], 2)} ({m['n']} patients) |"
            )
    files = report["files"]
    shipped = [e for e in files.values() if e["status"] == "usable"]
    lines += [
        "",
        "Files: "
        + ", ".join(f"`{e['path']}` {e['size_bytes'] / 1e6:.2f} MB" for e in shipped)
        + ("" if report.get("int8_usable") else "; int8 not shipped: it failed its accuracy gate (see the card)"),
    ]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} block to fill")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(f"{head}{README_START}\n{block}\n{README_END}{tail}", encoding="utf-8")
    os.replace(tmp, readme)


def refresh_shipped(models_dir: Path, readme: Path, edit, remeasure: bool = False) -> int:
    """Edit each shipped file in place (``edit(onnx_model, contract) -> contract``: the graph, the contract or
    both), then write the new sha256 and size (with ``remeasure``, the throughput measured again here, the
    graph having changed) into the export report, the model card and the README."""
    import onnx

    from idc_export.card import measure_throughput, render_model_card
    from idc_export.convert import set_contract
    from idc_infer.contract import contract_from_metadata
    from idc_infer.files import atomic_path, write_json
    from idc_infer.model import sha256_of

    report_path = models_dir / "export-report.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    for precision, entry in report["files"].items():
        path = models_dir / entry["path"]
        if not path.exists():
            continue
        onnx_model = onnx.load(str(path))
        metadata = {prop.key: prop.value for prop in onnx_model.metadata_props}
        contract = edit(onnx_model, contract_from_metadata(metadata, str(path)))  # the file is loaded once
        set_contract(onnx_model, contract)
        with atomic_path(path, mode="wb") as handle:
            handle.write(onnx_model.SerializeToString())
        entry["sha256"], entry["size_bytes"] = sha256_of(path), path.stat().st_size
        if remeasure:
            entry["throughput_patches_per_s"] = measure_throughput(
                path, report.get("throughput_batch", 32), report.get("throughput_threads", 2)
            )
        if precision == "fp32":
            report["contract"] = json.loads(contract.to_json())
        print(f"{path.name}: sha256 {entry['sha256'][:12]}")
    if remeasure and "machine" in report:  # the same machine kind; the load while measuring is this run's
        report["machine"]["load_average_1min"] = os.getloadavg()[0]
    write_json(report_path, report)
    with atomic_path(models_dir / "MODEL_CARD.md") as handle:
        handle.write(render_model_card(report))
    if models_dir.resolve() == (REPO / "models").resolve():
        update_readme(readme, readme_block(report))
    return 0


def stamp_scale(models_dir: Path, readme: Path) -> int:
    """Record the training patches' physical scale in the shipped contracts (models exported before schema 3);
    the graphs and every fitted number stay as they are."""
    from idc_infer.contract import PUBLIC_SET_PATCH_MPP, SCHEMA_VERSION

    def edit(onnx_model, contract):
        return contract.replace(patch_mpp=PUBLIC_SET_PATCH_MPP, schema_version=SCHEMA_VERSION)

    return refresh_shipped(models_dir, readme, edit)


def sample_inputs(contract, n_random: int = 2048):
    """The shipped sample patient's real patches (as the decoder gives them) plus uniform noise."""
    from idc_export.convert import load_parity_inputs

    return load_parity_inputs(contract, [REPO / "samples"], n_random=n_random)


def optimize_graph(models_dir: Path, readme: Path) -> int:
    """Apply export/graph.py's rewrites to the shipped files (exported before them); refuses to write a file
    whose probabilities are not bit-identical to the old graph's on the sample patches and 2,048 noise inputs."""
    from idc_export.graph import optimize_for_cpu
    from idc_infer.model import cpu_session

    def probabilities(data: bytes, inputs):
        session = cpu_session(data)
        name = session.get_inputs()[0].name
        return [session.run(None, {name: inputs[i : i + 16]})[0] for i in range(0, len(inputs), 16)]

    def edit(onnx_model, contract):
        inputs = sample_inputs(contract)
        before = probabilities(onnx_model.SerializeToString(), inputs)
        rewrites = optimize_for_cpu(onnx_model)
        after = probabilities(onnx_model.SerializeToString(), inputs)
        if not all((a == b).all() for a, b in zip(before, after)):
            raise SystemExit("the rewritten graph's outputs differ from the shipped one's: nothing written")
        print(f"graph rewrites {rewrites}; outputs bit-identical on {len(inputs)} inputs")
        provenance = dict(contract.provenance)
        provenance["export"] = {**provenance.get("export", {}), "graph_rewrites": rewrites}
        return contract.replace(provenance=provenance)

    return refresh_shipped(models_dir, readme, edit, remeasure=True)


def export_and_ship(run_dir: Path, models_dir: Path, bin_dir: Path) -> int:
    """idc-export --int8 into RUN_DIR/export; copy only files that passed their gates into models/."""
    export_dir = run_dir / "export"
    export = [
        str(bin_dir / "idc-export"),
        str(run_dir / "model.keras"),
        "--out",
        str(export_dir),
        "--int8",
        "--bench-threads",
        "2",
    ]
    print("+", " ".join(export), flush=True)
    status = subprocess.run(export).returncode
    if status not in (0, EXIT_INT8_GATE):
        return status
    from idc_export.bundle import CARD_NAME, FP32_NAME, INT8_NAME, REPORT_NAME

    report = json.loads((export_dir / REPORT_NAME).read_text())
    shipped = [FP32_NAME, REPORT_NAME, CARD_NAME]
    if report["int8_usable"]:
        shipped.append(INT8_NAME)
    else:
        print("int8 failed its accuracy gate: shipping fp32 only (see MODEL_CARD.md)", file=sys.stderr)
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in (INT8_NAME, "MODEL_CARD.json"):  # stale files of an earlier build
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
