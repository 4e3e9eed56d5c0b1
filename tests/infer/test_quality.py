"""Patch quality control, QuPath tile exports and the GeoJSON frame."""

import csv
import json
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
from click.testing import CliRunner

from idc_infer.cli import main
from idc_infer.contract import Contract
from idc_infer.preprocess import decode_file
from idc_infer.quality import QualityControl
from idc_infer.schema import STATUS_BACKGROUND, STATUS_BLURRED

from ..conftest import SAMPLE_PATIENT

SLIDE = Path(__file__).resolve().parents[1] / "data" / "cmu_small_region.svs"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_blank_black_and_one_pixel_patches_are_never_called_idc(tmp_path):
    patient = tmp_path / "77001"
    shutil.copytree(SAMPLE_PATIENT, patient)
    real = sorted(patient.rglob("*.png"))[0]
    blurred = cv2.GaussianBlur(cv2.imread(str(real)), (0, 0), 2.0)
    cv2.imwrite(str(patient / "blurred.png"), blurred)
    _write(patient / "white.png", np.full((50, 50, 3), 255, np.uint8))
    _write(patient / "glass.png", np.full((50, 50, 3), 238, np.uint8))
    _write(patient / "black.png", np.zeros((50, 50, 3), np.uint8))
    _write(patient / "one_white.png", np.full((1, 1, 3), 255, np.uint8))
    _write(patient / "one_pink.png", np.array([[[200, 80, 160]]], np.uint8))
    result = run([patient, "--out", tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "out" / "77001.csv")}
    expected = {
        "white.png": STATUS_BACKGROUND,
        "glass.png": STATUS_BACKGROUND,
        "black.png": STATUS_BACKGROUND,
        "one_white.png": STATUS_BACKGROUND,
        "one_pink.png": STATUS_BLURRED,
        "blurred.png": STATUS_BLURRED,
    }
    for name, status in expected.items():
        assert rows[name]["status"] == status, (name, rows[name])
        assert rows[name]["prob_idc"] == "" and rows[name]["pred"] == ""
        assert "not scored" in rows[name]["message"]
    assert rows[real.name]["status"] == "ok"
    summary = read_csv(tmp_path / "out" / "summary.csv")[0]
    n_real = len(list(SAMPLE_PATIENT.rglob("*.png")))
    assert (summary["n_scored"], summary["n_background"], summary["n_blurred"], summary["n_failed"]) == (
        str(n_real),
        "4",
        "2",
        "0",
    )
    n_idc = sum(r["pred"] == "1" for r in rows.values())
    assert float(summary["idc_fraction"]) == round(n_idc / n_real, 6)  # the skipped patches are left out
    assert "4 background and 2 blurred" in summary["notes"]
    # --no-qc scores them all, as before quality control
    result = run([patient, "--out", tmp_path / "out-noqc", "--no-qc", "-q"])
    assert all(r["status"] == "ok" for r in read_csv(tmp_path / "out-noqc" / "77001.csv"))


def test_quality_control_flags_under_one_percent_of_real_patches(real_data):
    """The real patches of the public set are all tissue (as cut by its authors): QC must keep >99% of them."""
    with open(real_data / "manifest.csv", newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle) if row["uniform_sample"] == "1"]
    random.Random(0).shuffle(paths)
    contract, qc = Contract(), QualityControl()
    statuses = [decode_file(real_data / p, contract, qc).status for p in paths[:3000]]
    flagged = sum(s in (STATUS_BACKGROUND, STATUS_BLURRED) for s in statuses)
    assert flagged / len(statuses) < 0.01, flagged


def test_quality_control_catches_blurred_real_patches(real_data):
    with open(real_data / "manifest.csv", newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle) if row["uniform_sample"] == "1"][:500]
    qc = QualityControl()
    caught = 0
    kept = 0
    for p in paths:
        rgb = cv2.cvtColor(cv2.imread(str(real_data / p)), cv2.COLOR_BGR2RGB)
        if qc.check(rgb) is not None:
            continue  # glass of the set itself
        kept += 1
        caught += (qc.check(cv2.GaussianBlur(rgb, (0, 0), 2.0)) or ("",))[0] == STATUS_BLURRED
    assert caught / kept > 0.95, (caught, kept)


def test_qupath_tile_exports_keep_their_level0_region(tmp_path):
    """A QuPath TileExporter name gives the region in full-resolution pixels; the tile is resampled to the
    model's 50 px and scores as the same tile read from the slide."""
    import tiffslide

    slide = tiffslide.TiffSlide(str(SLIDE))
    out = tmp_path / "qupath" / "cmu"
    out.mkdir(parents=True)
    tile = np.asarray(slide.read_region((802, 401), 0, (401, 401), as_array=True))
    _write(out / "cmu_small_region [x=802,y=401,w=401,h=401].png", tile)
    result = run([out, "--out", tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    [row] = read_csv(tmp_path / "out" / "cmu.csv")
    assert (row["x"], row["y"], row["width_px"], row["height_px"], row["status"]) == ("802", "401", "401", "401", "ok")
    assert "QuPath tile: 401x401 px resampled to 50x50" in row["message"]
    direct = run([SLIDE, "--out", tmp_path / "direct", "-q"])
    assert direct.exit_code == 0
    by_xy = {(r["x"], r["y"]): r["prob_idc"] for r in read_csv(tmp_path / "direct" / "cmu_small_region.csv")}
    assert row["prob_idc"] == by_xy[("802", "401")]
    feature = json.loads((tmp_path / "out" / "cmu.geojson").read_text())["features"][0]
    assert feature["geometry"]["coordinates"][0][2] == [1203, 802]


def test_geojson_scale_maps_patch_coordinates_to_level0(tmp_path):
    plain = run([SAMPLE_PATIENT, "--out", tmp_path / "plain", "-q"])
    scaled = run([SAMPLE_PATIENT, "--out", tmp_path / "scaled", "--geojson-scale", "16", "-q"])
    assert plain.exit_code == scaled.exit_code == 0
    a = json.loads((tmp_path / "plain" / "10253.geojson").read_text())
    b = json.loads((tmp_path / "scaled" / "10253.geojson").read_text())
    assert "file names" in a["idc"]["frame"] and a["idc"]["scale"] == 1.0
    assert "level-0" in b["idc"]["frame"] and b["idc"]["scale"] == 16.0
    for fa, fb in zip(a["features"], b["features"]):
        assert fb["geometry"]["coordinates"] == [[[16 * x, 16 * y] for x, y in fa["geometry"]["coordinates"][0]]]
        assert fa["properties"] == fb["properties"]


def test_mosaic_draws_skipped_patches_as_tissue_not_as_failures():
    from idc_infer.review import FAILED_RGB, MosaicCanvas

    canvas = MosaicCanvas(1.0)
    glass = np.full((50, 50, 3), 240, np.uint8)
    canvas.add_patch(0, 0, 50, 50, glass, None, None, skipped=True)
    canvas.add_patch(50, 0, 50, 50, None, None, None)  # a failed patch, for contrast
    assert (canvas.n_scored, canvas.n_failed) == (0, 1)
    assert (canvas.tissue[:, :50] == 240).all() and np.isnan(canvas.prob[:, :50]).all()
    assert (canvas.marks[:, :50] == 0).all() and (canvas.marks[:, 50:] != 0).any()
    assert tuple(canvas.tissue[25, 51]) == FAILED_RGB


def test_a_batch_is_checked_as_its_patches_one_at_a_time(real_data):
    """idc-infer checks a batch at once (check_batch: tissue and sharpness for the whole stack); each patch must
    get the status and message check gives it alone, glass, blur and patches at the sharpness threshold included,
    and the stack's tissue fractions, sharpness and mean colours must be the per-patch values."""
    from idc_infer.preprocess import patch_mean_colour, patch_mean_colours
    from idc_infer.quality import sharpness, sharpnesses, tissue_fraction, tissue_fractions

    with open(real_data / "manifest.csv", newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)][::40][:400]
    rgbs = [cv2.imread(str(real_data / p), cv2.IMREAD_COLOR_RGB) for p in paths]
    rgbs = [rgb for rgb in rgbs if rgb.shape == (50, 50, 3)]
    glass = np.full((50, 50, 3), 235, np.uint8)
    blurred = [cv2.GaussianBlur(rgb, (0, 0), 2.0) for rgb in rgbs[:40]]
    stack = np.stack(rgbs + [glass] + blurred)
    qc = QualityControl()
    alone = [qc.check(rgb) for rgb in stack]
    assert sum(flag is not None for flag in alone) > 30  # glass and blur are in the batch
    assert qc.check_batch(stack) == alone
    # thresholds at a patch's own sharpness and tissue and one float step either side (flagged just above it,
    # kept at and below): the batch decides those exactly as check does
    for j in (0, 1, len(rgbs) + 1):
        sharp, tissue = sharpness(stack[j]), tissue_fraction(stack[j])
        edges = [QualityControl(min_sharpness=float(v)) for v in (sharp, *np.nextafter(sharp, [np.inf, -np.inf]))]
        edges += [QualityControl(min_tissue=float(v)) for v in (tissue, *np.nextafter(tissue, [np.inf, -np.inf]))]
        for edge in edges:
            assert edge.check_batch(stack) == [edge.check(rgb) for rgb in stack]
        just_above = QualityControl(min_sharpness=float(np.nextafter(sharp, np.inf)))
        if tissue >= just_above.min_tissue:  # a tissue patch just under the sharpness threshold: flagged blurred
            assert just_above.check_batch(stack[j : j + 1])[0][0] == STATUS_BLURRED
    np.testing.assert_array_equal(tissue_fractions(stack), [tissue_fraction(rgb) for rgb in stack])
    np.testing.assert_allclose(sharpnesses(stack), [sharpness(rgb) for rgb in stack], rtol=1e-12)
    assert patch_mean_colours(stack) == [patch_mean_colour(rgb) for rgb in stack]
    # odd sizes and single-pixel sides: the same values
    rng = np.random.default_rng(0)
    for shape in [(3, 1, 1, 3), (2, 2, 2, 3), (4, 1, 7, 3), (2, 9, 1, 3), (5, 13, 17, 3), (0, 50, 50, 3)]:
        small = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(tissue_fractions(small), [tissue_fraction(rgb) for rgb in small])
        np.testing.assert_allclose(sharpnesses(small), [sharpness(rgb) for rgb in small], rtol=1e-12, atol=1e-9)
        assert patch_mean_colours(small) == [patch_mean_colour(rgb) for rgb in small]
