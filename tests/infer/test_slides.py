"""Whole-slide images: tissue found, tiles at the contract's scale, reports whose coordinates lie on the slide.

Uses tests/data/cmu_small_region.svs: the OpenSlide project's CMU-1-Small-Region (CC0), an Aperio SVS of
2220x2967 px at 0.499 um/px (20x), a single level. Not breast tissue: these tests check reading, scale,
tissue detection and tiling, never accuracy.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from idc_infer.cli import main
from idc_infer.contract import PUBLIC_SET_PATCH_MPP
from idc_infer.tile import main as tile_main

SLIDE = Path(__file__).resolve().parents[1] / "data" / "cmu_small_region.svs"
SLIDE_SIZE = (2220, 2967)  # level-0 width, height
SLIDE_MPP = 0.499
TILE_PX = round(50 * PUBLIC_SET_PATCH_MPP / SLIDE_MPP)  # 401: a 200 um tile at 0.499 um/px


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run(command, args):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("slide") / "out"
    result = run(main, [SLIDE, "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_slide_tiles_are_at_the_model_scale_and_inside_the_slide(slide_run):
    rows = read_csv(slide_run / "cmu_small_region.csv")
    assert rows and all(r["status"] == "ok" for r in rows)
    for r in rows:
        x, y, w, h = (int(r[k]) for k in ("x", "y", "width_px", "height_px"))
        assert w == h == TILE_PX
        assert 0 <= x and x + w <= SLIDE_SIZE[0] and 0 <= y and y + h <= SLIDE_SIZE[1]
        assert r["path"] == f"cmu_small_region.svs [x={x},y={y},w={w},h={h}]"
    run_info = json.loads((slide_run / "run.json").read_text())
    record = run_info["slides"]["cmu_small_region"]
    assert record["mpp"] == pytest.approx(SLIDE_MPP) and record["mpp_source"] == "tiffslide.mpp-x in the file"
    assert record["tile_px_level0"] == TILE_PX
    # the grid covers the whole tiles of the slide; the tissue ones are scored, the rest counted as glass
    assert record["n_grid_tiles"] == (SLIDE_SIZE[0] // TILE_PX) * (SLIDE_SIZE[1] // TILE_PX)
    assert record["n_tissue_tiles"] == len(rows)
    assert record["n_glass_tiles"] == record["n_grid_tiles"] - len(rows) > 0
    summary = {r["patient_id"]: r for r in read_csv(slide_run / "summary.csv")}
    assert int(summary["cmu_small_region"]["n_scored"]) == len(rows)
    assert f"{record['n_glass_tiles']} skipped as glass" in summary["cmu_small_region"]["notes"]
    assert "0.499 um/px" in summary["cmu_small_region"]["notes"]


def test_tissue_detection_skips_the_glass(slide_run):
    """Tiles with tissue in the thumbnail are scored; the white glass of the corners is not."""
    import tiffslide

    from idc_infer.quality import tissue_fraction

    slide = tiffslide.TiffSlide(str(SLIDE))
    scored = {(int(r["x"]), int(r["y"])) for r in read_csv(slide_run / "cmu_small_region.csv")}
    for r in range(SLIDE_SIZE[1] // TILE_PX):
        for c in range(SLIDE_SIZE[0] // TILE_PX):
            x, y = round(c * 50 * PUBLIC_SET_PATCH_MPP / SLIDE_MPP), round(r * 50 * PUBLIC_SET_PATCH_MPP / SLIDE_MPP)
            tile = slide.read_region((x, y), 0, (TILE_PX, TILE_PX), as_array=True)
            fraction = tissue_fraction(np.asarray(tile))
            if fraction > 0.2:
                assert (x, y) in scored, (x, y, fraction)
            if fraction < 0.01:
                assert (x, y) not in scored, (x, y, fraction)
    assert (0, 0) not in scored  # the top-left corner is glass


def test_slide_geojson_is_in_level0_pixels(slide_run):
    collection = json.loads((slide_run / "cmu_small_region.geojson").read_text())
    assert "level-0" in collection["idc"]["frame"] and collection["idc"]["scale"] == 1.0
    assert "research use only" in collection["idc"]["notice"]
    rows = {(int(r["x"]), int(r["y"])) for r in read_csv(slide_run / "cmu_small_region.csv")}
    assert len(collection["features"]) == len(rows)
    for feature in collection["features"]:
        ring = feature["geometry"]["coordinates"][0]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert (min(xs), min(ys)) in rows
        assert max(xs) - min(xs) == max(ys) - min(ys) == TILE_PX
        assert max(xs) <= SLIDE_SIZE[0] and max(ys) <= SLIDE_SIZE[1]
    import geojson_pydantic

    geojson_pydantic.FeatureCollection.model_validate(collection)


def test_idc_tile_then_idc_infer_scores_as_the_direct_run(slide_run, tmp_path):
    result = run(tile_main, [SLIDE, "--out", tmp_path / "tiles"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "tiles" / "idc-tile.json").read_text())["slides"]["cmu_small_region"]
    assert record["level0_px_per_patch_px"] == pytest.approx(TILE_PX / 50)
    files = sorted((tmp_path / "tiles" / "cmu_small_region").iterdir())
    assert all(f.name.startswith("cmu_small_region_idx5_x") for f in files)
    result = run(main, [tmp_path / "tiles", "--out", tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    direct = {(int(r["x"]), int(r["y"])): r["prob_idc"] for r in read_csv(slide_run / "cmu_small_region.csv")}
    from_files = read_csv(tmp_path / "out" / "cmu_small_region.csv")
    assert len(from_files) == len(direct) == record["tiles_written"]
    tile0 = 50 * PUBLIC_SET_PATCH_MPP / SLIDE_MPP
    for r in from_files:
        col, row = int(r["x"]) // 50, int(r["y"]) // 50  # patch-frame file names, 50 px steps
        assert r["prob_idc"] == direct[(round(col * tile0), round(row * tile0))]


def test_slide_resume_keeps_an_unchanged_slide(slide_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(slide_run, out)
    before = (out / "cmu_small_region.csv").stat().st_mtime_ns
    result = run(main, [SLIDE, "--out", out, "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["counts"]["patients_resumed"] == 1
    assert (out / "cmu_small_region.csv").stat().st_mtime_ns == before
    # another tissue threshold tiles the slide differently: it is scored again
    result = run(main, [SLIDE, "--out", out, "--resume", "--min-tissue", "0.5", "-q"])
    assert json.loads((out / "run.json").read_text())["counts"]["patients_resumed"] == 0


def test_slide_without_pixel_size_gets_a_row_naming_mpp(tmp_path):
    import tifffile

    image = np.full((900, 900, 3), 235, dtype=np.uint8)
    image[200:700, 200:700] = (180, 90, 150)  # a pink square of "tissue"
    image[200:700, 200:700, 1] += np.random.default_rng(0).integers(0, 60, (500, 500)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "nompp.tif", image, photometric="rgb", tile=(256, 256))
    result = run(main, [tmp_path / "nompp.tif", "--out", tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "nompp.csv")
    assert len(rows) == 1 and rows[0]["status"] == "slide_without_mpp"
    assert "--mpp" in rows[0]["message"] and "nompp.tif" in rows[0]["message"]
    assert "slide not scored" in read_csv(tmp_path / "out" / "summary.csv")[0]["notes"]
    strict = run(main, [tmp_path / "nompp.tif", "--out", tmp_path / "out2", "--strict", "-q"])
    assert strict.exit_code == 1
    # --mpp supplies it: 0.5 um/px makes 400 px tiles, so the 500 px square holds one or more whole tiles
    result = run(main, [tmp_path / "nompp.tif", "--out", tmp_path / "out3", "--mpp", "0.5", "-q"])
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out3" / "nompp.csv")
    assert rows and all(int(r["width_px"]) == 400 for r in rows)
    assert json.loads((tmp_path / "out3" / "run.json").read_text())["slides"]["nompp"]["mpp_source"] == "--mpp"


def test_a_model_without_a_scale_is_a_usage_error_naming_patch_mpp(tmp_path, demo_onnx):
    from .test_cli import _with_contract

    unscaled = tmp_path / "unscaled.onnx"
    _with_contract(demo_onnx, unscaled, patch_mpp=None)
    result = run(main, [SLIDE, "--model", unscaled, "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "--patch-mpp" in result.output
    result = run(main, [SLIDE, "--model", unscaled, "--patch-mpp", "4", "--out", tmp_path / "out2", "-q"])
    assert result.exit_code == 0, result.output


def test_a_file_that_is_not_a_slide_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = run(main, [tmp_path / "notes.txt", "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "notes.txt" in result.output and "not a slide" in result.output


def test_without_a_reader_the_message_names_the_extra(monkeypatch):
    import sys

    from idc_infer.slides import SlideError, open_slide

    monkeypatch.setitem(sys.modules, "tiffslide", None)
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(SlideError, match=r"idc\[slides\]"):
        open_slide(SLIDE)


def test_slide_ids_parse_back_from_tile_names():
    from idc_infer.naming import parse_patch_name
    from idc_infer.slides import slide_id_of
    from idc_infer.tile import tile_name

    for file_name, expected in [
        ("cmu_small_region.svs", "cmu_small_region"),
        ("TCGA-A1.B2 x (1).svs", "TCGA-A1.B2-x--1-"),
        ("_hidden.ndpi", "slide-_hidden"),
    ]:
        slide_id = slide_id_of(Path(file_name))
        assert slide_id == expected
        parsed = parse_patch_name(tile_name(slide_id, 3, 4, 50))
        assert (parsed.patient_id, parsed.x, parsed.y) == (slide_id, 150, 200)


def _damaged_slide(path: Path) -> Path:
    """A copy of the test slide with a band of its JPEG tiles zeroed: reading them raises in the codec."""
    import shutil

    import tifffile

    shutil.copyfile(SLIDE, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(path, "r+b") as handle:
        for offset, count in spans[len(spans) // 2 : len(spans) // 2 + 8]:
            handle.seek(offset)
            handle.write(b"\0" * count)
    return path


def test_a_damaged_slide_is_its_own_row_and_the_run_goes_on(tmp_path):
    from idc_train.synthetic import write_cohort

    write_cohort(tmp_path / "cohort", n_patients=1, seed=2, grid=3)
    damaged = _damaged_slide(tmp_path / "damaged.svs")
    result = run(main, [tmp_path / "cohort", damaged, "--out", tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    summary = {r["patient_id"]: r for r in read_csv(tmp_path / "out" / "summary.csv")}
    assert set(summary) == {"90001", "damaged", "(cohort)"}
    assert summary["90001"]["n_scored"] == "9"  # the patient folder beside it is scored as ever
    rows = read_csv(tmp_path / "out" / "damaged.csv")
    assert rows[-1]["status"] == "slide_unreadable" and "reading stopped" in rows[-1]["message"]
    assert "slide not scored" in summary["damaged"]["notes"]
    # under Dask the same slide is a row too, not the end of the run
    result = run(main, [tmp_path / "cohort", damaged, "--out", tmp_path / "out-dask", "--dask", "local:1", "-q"])
    assert result.exit_code == 0, result.output
    assert read_csv(tmp_path / "out-dask" / "damaged.csv")[-1]["status"] == "slide_unreadable"
