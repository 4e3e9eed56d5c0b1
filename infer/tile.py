"""The ``idc-tile`` command: cut slides into patch files at the model's scale, for those who want the folder.

Same tissue detection and scale as ``idc-infer SLIDE``; file names in the public set's pattern
``<slide>_idx5_x<X>_y<Y>.png`` (no class), with X, Y in the patch frame (50 px steps, as the public set's),
so every other command works on them and ``idc-infer`` scores them exactly as it scores the slide. Level-0
pixels of a patch = X, Y times ``level0_px_per_patch_px`` (in idc-tile.json; ``--geojson-scale`` of idc-infer).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import EXIT_FAILED
from .files import RESEARCH_NOTICE, atomic_path, write_json
from .options import slide_options


def tile_name(slide_id: str, col: int, row: int, native_px: int) -> str:
    return f"{slide_id}_idx5_x{col * native_px}_y{row * native_px}.png"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the tiles: one sub-folder per slide, named by its id.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Model whose contract gives the tile scale [default: the shipped model].",
)
@slide_options
@click.option("--overwrite", is_flag=True, help="Replace a slide's tile folder that exists already.")
@click.version_option(__version__, prog_name="idc-tile")
def main(slides, out_dir, model_path, mpp, patch_mpp, min_tissue, overwrite):
    """Cut each SLIDE's tissue into patch PNGs at the model's scale (research use only)."""
    import cv2

    from .contract import ContractError
    from .model import ModelError, default_model_path, load_model
    from .slides import SLIDE_SUFFIXES, SlideError, SlideFailure, is_slide_path, slide_patients

    for path in slides:
        if not is_slide_path(path):
            raise click.BadParameter(f"{path} is not a slide ({', '.join(SLIDE_SUFFIXES)})", param_hint="SLIDES")
    try:
        contract = load_model(model_path or default_model_path(), threads=1).contract
    except (ModelError, ContractError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    try:
        patients = slide_patients(list(slides), contract, mpp, patch_mpp, min_tissue)
    except SlideError as exc:
        raise click.BadParameter(str(exc), param_hint="--patch-mpp") from None
    ids = [p.patient_id for p in patients]
    if len(set(ids)) < len(ids):
        raise click.UsageError(f"slides with the same id would share a folder: {', '.join(sorted(ids))}")
    for patient in patients:
        folder = out_dir / patient.patient_id
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise click.UsageError(f"{folder} holds files already; pass --overwrite to replace them")

    record = {"notice": RESEARCH_NOTICE, "idc_version": __version__, "slides": {}}
    failed = 0
    native = contract.native_patch_px
    for patient in patients:
        folder = out_dir / patient.patient_id
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{patient.patient_id}_idx5_x*_y*.png"):
            old.unlink()
        written = unreadable = 0
        try:
            for tile in patient.iter_paths():
                if isinstance(tile, SlideFailure):  # the slide could not be read
                    failed += 1
                    click.echo(f"idc-tile: {tile.message}", err=True)
                    break
                try:
                    rgb = patient.read_tile(tile)
                except Exception as exc:  # noqa: BLE001 - a damaged tile is skipped and counted, the slide goes on
                    unreadable += 1
                    click.echo(
                        f"idc-tile: {patient.slide.name}: tile x={tile.x} y={tile.y} unreadable ({exc})", err=True
                    )
                    continue
                ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                if not ok:
                    raise OSError(f"could not encode a tile of {patient.slide.name}")
                with atomic_path(folder / tile_name(patient.patient_id, tile.col, tile.row, native), "wb") as handle:
                    handle.write(encoded.tobytes())
                written += 1
        except OSError as exc:
            click.echo(f"idc-tile: cannot write tiles of {patient.slide.name} into {folder}: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        finally:
            patient.finish()
        stats = patient.stats
        record["slides"][patient.patient_id] = stats.record() | {
            "file": patient.slide.name,
            "tiles_written": written,
            "tiles_unreadable": unreadable,
            "patch_mpp": patient.patch_mpp,
            "native_patch_px": native,
            "level0_px_per_patch_px": (stats.tile_px_level0 / native) if stats.tile_px_level0 else None,
        }
        failed += unreadable > 0
        if stats.error is None:
            click.echo(f"{patient.patient_id}\t{written} tiles\t{stats.note()}")
    write_json(out_dir / "idc-tile.json", record)
    click.echo(f"tiles in {out_dir}; score them with: idc-infer {out_dir} ({RESEARCH_NOTICE})")
    if failed:
        sys.exit(EXIT_FAILED)
