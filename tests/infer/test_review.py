"""Review outputs: the mosaic is hot exactly at the IDC patches, the GeoJSON validates, report.html opens."""

import csv
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from idc_infer.cli import main
from idc_infer.files import RESEARCH_NOTICE, safe_file_stem
from idc_infer.review import (
    BACKGROUND_RGB,
    FAILED_RGB,
    MARK_RGB,
    GeoJsonSink,
    MosaicSink,
    blend,
    heat_rgb,
    review_sink_factories,
    write_report_html,
)
from idc_infer.schema import PatchRow
from idc_train.synthetic import write_cohort, write_patient

from ..conftest import SAMPLE_PATIENT, require_module

CHROMIUM = Path("/usr/bin/chromium")
TISSUE_GREY = 200  # uniform patches, so every overlay pixel has one expected value
THRESHOLD = 0.5


def row_for(x, y, prob, label=None, status="ok", width_px=50, height_px=50, path=None):
    return PatchRow(
        path or f"p_idx5_x{x}_y{y}.png",
        x,
        y,
        width_px,
        height_px,
        prob,
        None if prob is None else int(prob >= THRESHOLD),
        label,
        status,
    )


def grey_patch(width_px, height_px):
    return np.full((height_px, width_px, 3), TISSUE_GREY, dtype=np.uint8)


def expected_colour(prob):
    return blend(np.array([[TISSUE_GREY] * 3], dtype=np.uint8), heat_rgb(np.array([prob])))[0]


def cell_px(layout, x, y, width_px, height_px, panel="heat"):
    """Image rows/cols of a patch's cell, less a 1 px rim where the threshold outline may run."""
    c0, r0 = layout.image_px(x, y, panel)
    c1, r1 = layout.image_px(x + width_px, y + height_px, panel)
    return slice(r0 + 1, r1 - 1), slice(c0 + 1, c1 - 1)


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def known_patient(tmp_path_factory):
    """An 8x8 synthetic patient with an IDC disc: (x, y, width_px, height_px, label) per patch."""
    root = tmp_path_factory.mktemp("known")
    patches = write_patient(root, "91001", seed=4, grid=8, idc_radius=2.6)
    cells = []
    for patch in patches:
        height_px, width_px = cv2.imread(str(patch.path)).shape[:2]
        cells.append((patch.x, patch.y, width_px, height_px, patch.label))
    labels = {c[4] for c in cells}
    assert labels == {0, 1}
    return cells


def grid_px(value, scale):
    return math.floor(value * scale + 1e-9)


@pytest.mark.parametrize("scale", [0.25, 0.3, 1.0])
def test_overlay_is_hot_exactly_at_idc_patches(tmp_path, known_patient, scale):
    missing = next(c for c in known_patient if c[4] == 0 and c[0] > 1 and c[1] > 1 and c[2] == 50)
    fed = [c for c in known_patient if c != missing]
    sink = MosaicSink("91001", tmp_path, "91001", THRESHOLD, scale=scale)
    for x, y, w, h, label in fed:
        sink.add(row_for(x, y, float(label), label, width_px=w, height_px=h), grey_patch(w, h))
    sink.close()
    image = read_rgb(tmp_path / "91001_mosaic.png")
    layout = sink.layout
    assert image.shape[1::-1] == layout.image_size_px
    assert layout.origin_px == (grid_px(1, scale), grid_px(1, scale))
    assert layout.truth_xy is not None
    hot, cold = expected_colour(1.0), expected_colour(0.0)
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0] + 40  # red-ish vs blue-ish, as a reader sees it
    for x, y, w, h, label in known_patient:
        for panel in ("heat", "truth"):
            cell = image[cell_px(layout, x, y, w, h, panel)]
            assert cell.size, (x, y, scale)
            if (x, y) == missing[:2]:
                assert (cell == BACKGROUND_RGB).all(), "a missing patch must stay blank"
            else:
                assert (cell == (hot if label else cold)).all(), (x, y, label, panel, scale)
    # patch edges tile the panel without gaps: blank exactly where no patch was given
    (left, top), (width, height) = layout.heat_xy, layout.panel_size_px
    covered = np.zeros((height, width), dtype=bool)
    origin = grid_px(1, scale)
    for x, y, w, h, _ in fed:
        covered[
            grid_px(y, scale) - origin : grid_px(y + h, scale) - origin,
            grid_px(x, scale) - origin : grid_px(x + w, scale) - origin,
        ] = True
    assert (width, height) == (grid_px(401, scale) - origin, grid_px(401, scale) - origin)
    blank = (image[top : top + height, left : left + width] == BACKGROUND_RGB).all(axis=2)
    assert np.array_equal(blank, ~covered)


def test_failed_patches_are_crossed_and_unplaced_ones_skipped(tmp_path):
    sink = MosaicSink("p", tmp_path, "p", THRESHOLD, scale=0.5)
    sink.add(row_for(1, 1, 0.9), grey_patch(50, 50))
    sink.add(row_for(51, 1, None, status="corrupt_image", width_px=None, height_px=None), None)
    sink.add(row_for(None, None, 0.9), grey_patch(50, 50))
    sink.close()
    assert sink.n_without_xy == 1
    image = read_rgb(tmp_path / "p_mosaic.png")
    col, row = sink.layout.image_px(51, 1)
    failed = image[row : row + 25, col : col + 25]
    assert (failed[12, 12] == MARK_RGB).all() and (failed[0, 0] == MARK_RGB).all()  # the X
    assert (failed[3, 12] == FAILED_RGB).all()  # the grey fill beside it
    assert sink.layout.panel_size_px == (50, 25)
    assert sink.layout.truth_xy is None  # no labels: no ground-truth panel
    with pytest.raises(ValueError, match="no ground-truth panel"):
        sink.layout.image_px(51, 1, "truth")


def ink_runs(columns: np.ndarray, min_gap_px: int = 7) -> list[tuple[int, int]]:
    """(first, last) column of each run of inked columns; a title's own letter and word gaps are narrower."""
    cols = np.flatnonzero(columns)
    breaks = np.flatnonzero(np.diff(cols) > min_gap_px)
    return [(int(cols[a]), int(cols[b])) for a, b in zip(np.r_[0, breaks + 1], np.r_[breaks, len(cols) - 1])]


def test_panel_titles_of_a_tiny_patient_do_not_overprint(tmp_path):
    """One labelled patch at scale 0.25: 12 px panels, far narrower than their titles."""
    sink = MosaicSink("p", tmp_path, "p", THRESHOLD, scale=0.25)
    sink.add(row_for(1, 1, 0.9, label=1), grey_patch(50, 50))
    sink.close()
    image = read_rgb(tmp_path / "p_mosaic.png")
    (heat_left, top), (truth_left, _) = sink.layout.heat_xy, sink.layout.truth_xy
    titles = image[top - 16 : top]  # the line of panel titles just above the panels
    runs = ink_runs((titles != image[0, 0]).any(axis=2).any(axis=0))
    heat_run = next(run for run in runs if abs(run[0] - heat_left) <= 1)
    truth_run = next((run for run in runs if abs(run[0] - truth_left) <= 1), None)
    assert truth_run is not None, f"the ground-truth title runs into the model's: ink runs {runs}"
    assert heat_run[1] < truth_run[0] - 7


def test_no_placeable_patch_removes_a_stale_mosaic(tmp_path):
    (tmp_path / "p_mosaic.png").write_bytes(b"old")
    sink = MosaicSink("p", tmp_path, "p", THRESHOLD)
    sink.add(row_for(None, None, 0.2), grey_patch(50, 50))
    sink.close()
    assert not (tmp_path / "p_mosaic.png").exists()


def test_absurd_coordinates_skip_the_mosaic_instead_of_exhausting_memory(tmp_path, caplog):
    sink = MosaicSink("p", tmp_path, "p", THRESHOLD, scale=0.25)
    sink.add(row_for(1, 1, 0.2), grey_patch(50, 50))
    sink.add(row_for(10**9, 1, 0.2), grey_patch(50, 50))
    sink.add(row_for(51, 1, 0.2), grey_patch(50, 50))
    sink.close()
    assert not (tmp_path / "p_mosaic.png").exists()
    assert "no mosaic" in caplog.text and "--review-scale" in caplog.text


def test_mosaic_memory_follows_the_slide_not_the_patch_count(tmp_path):
    """3600 patches arriving last-first (the canvas grows left and up) give the same image as first-last."""
    grid, scale = 60, 0.1
    cells = [(1 + c * 50, 1 + r * 50, (r * 7 + c * 3) % 10 / 9) for r in range(grid) for c in range(grid)]
    images = []
    for order in (cells, cells[::-1]):
        out = tmp_path / str(len(images))
        out.mkdir()
        sink = MosaicSink("big", out, "big", THRESHOLD, scale=scale)
        rgb = grey_patch(50, 50)
        for x, y, prob in order:
            sink.add(row_for(x, y, prob), rgb)
        slide_px = (grid * 50 * scale) ** 2
        assert sink.canvas.nbytes <= 2.5 * slide_px * (3 + 4 + 1 + 1)  # growth slack: at most half again per side
        sink.close()
        images.append(read_rgb(out / "big_mosaic.png"))
    assert np.array_equal(images[0], images[1])


def scored_rows():
    probs = [0.1, 0.7, 0.5, 0.95]
    rows = [row_for(1 + 50 * i, 101, p, label=i % 2, width_px=50 if i < 3 else 31) for i, p in enumerate(probs)]
    rows.append(row_for(251, 101, None, status="corrupt_image", width_px=None, height_px=None))
    rows.append(row_for(None, None, 0.8, path="no_coordinates.png"))
    return rows


def test_geojson_has_one_qupath_tile_per_scored_patch(tmp_path):
    sink = GeoJsonSink("p<1>", tmp_path, "p_1_", THRESHOLD)
    rows = scored_rows()
    for row in rows:
        sink.add(row, None)
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p_1_.geojson"]  # no temp file left
    collection = json.loads((tmp_path / "p_1_.geojson").read_text(encoding="utf-8"))
    assert collection["type"] == "FeatureCollection"
    expected = [r for r in rows if r.status == "ok" and r.x is not None]
    features = collection["features"]
    assert len(features) == len(expected) == 4
    assert len({f["id"] for f in features}) == 4
    for feature, row in zip(features, expected):
        x, y, w, h = row.x, row.y, row.width_px, row.height_px
        assert feature["type"] == "Feature"
        assert feature["geometry"] == {
            "type": "Polygon",
            "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]],
        }
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"]["name"] == ("IDC" if row.prob_idc >= THRESHOLD else "non-IDC")
        colour = props["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        assert props["measurements"] == {"prob_idc": row.prob_idc, "pred": row.pred, "label": row.label}
        assert props["name"] == row.path


def test_geojson_validates_against_the_spec(tmp_path):
    geojson_pydantic = require_module("geojson_pydantic")
    sink = GeoJsonSink("p", tmp_path, "p", THRESHOLD)
    for row in scored_rows():
        sink.add(row, None)
    sink.close()
    collection = geojson_pydantic.FeatureCollection.model_validate_json((tmp_path / "p.geojson").read_text())
    assert len(collection.features) == 4
    assert all(f.geometry.type == "Polygon" for f in collection.features)
    empty = GeoJsonSink("none", tmp_path, "none", THRESHOLD)
    empty.close()
    empty_text = (tmp_path / "none.geojson").read_text()
    assert geojson_pydantic.FeatureCollection.model_validate_json(empty_text).features == []


def test_interrupted_patient_leaves_no_review_files(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from idc_infer.discover import Patient, SkipCounter
    from idc_infer.engine import RunSettings, score_patient
    from idc_infer.review import review_sink_factories

    class Boom(Exception):
        pass

    def exploding_paths(skipped=None):
        yield from sorted(SAMPLE_PATIENT.rglob("*.png"))[:3]
        raise Boom("interrupted mid-patient")

    from idc_infer.model import default_model_path, load_model

    model = load_model(default_model_path())
    patient = Patient("p", root=SAMPLE_PATIENT)
    patient.iter_paths = exploding_paths
    settings = RunSettings(tmp_path, 0.5, batch_size=2, sink_factories=review_sink_factories(0.5))
    with ThreadPoolExecutor(1) as pool, pytest.raises(Boom):
        score_patient(model, patient, settings, pool, SkipCounter())
    assert list(tmp_path.iterdir()) == []  # no CSV, no mosaic, no GeoJSON, no temp file


class LinkCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href"):
                self.links.append(value)

    def handle_data(self, data):
        self.text.append(data)


def run_info(demo=True):
    return {
        "model": {"path": "/models/demo.onnx", "sha256": "ab" * 32, "demo": demo, "trained_on": "synthetic <i>"},
        "arguments": {"threshold": THRESHOLD},
        "counts": {"patients": 2, "patches": 5, "scored": 4, "failed": 1},
        "timings": {"started_unix": 1.7e9},
        "versions": {"idc": "0.1.0"},
    }


TRICKY_ID = '<img src=x onerror=alert(1)>&"'


@pytest.fixture()
def report_dir(tmp_path):
    """An --out dir holding review outputs for one patient (an id full of markup) and none for another."""
    out = tmp_path / "reports"
    out.mkdir()
    stem = safe_file_stem(TRICKY_ID)
    sinks = [make(TRICKY_ID, out, stem, THRESHOLD) for make in review_sink_factories(0.25)]
    for row in scored_rows():
        for sink in sinks:
            sink.add(row, grey_patch(row.width_px, 50) if row.status == "ok" else None)
    for sink in sinks:
        sink.close()
    for name in (f"{stem}.csv", "plain.csv", "summary.csv", "run.json"):
        (out / name).write_text("written by the run\n")
    nan = float("nan")
    rows = [
        {
            "patient_id": TRICKY_ID,
            "n_patches": 6,
            "n_scored": 4,
            "n_failed": 2,
            "idc_fraction": 0.5,
            "idc_fraction_ci95_low": 0.15,
            "idc_fraction_ci95_high": 0.85,
            "mean_prob_idc": 0.5625,
            "n_labelled": 4,
            "true_idc_fraction": 0.5,
            "sensitivity": 1.0,
            "specificity": 0.5,
            "balanced_accuracy": 0.75,
        },
        {
            "patient_id": "plain",
            "n_patches": 0,
            "n_scored": 0,
            "n_failed": 0,
            "idc_fraction": nan,
            "idc_fraction_ci95_low": nan,
            "idc_fraction_ci95_high": nan,
            "mean_prob_idc": nan,
            "n_labelled": 0,
            "true_idc_fraction": None,
            "sensitivity": None,
            "specificity": None,
            "balanced_accuracy": None,
        },
        {
            "patient_id": "(cohort)",
            "n_patches": 6,
            "n_scored": 4,
            "n_failed": 2,
            "idc_fraction": 0.5,
            "idc_fraction_ci95_low": 0.15,
            "idc_fraction_ci95_high": 0.85,
            "mean_prob_idc": 0.5625,
            "n_labelled": 4,
        },
    ]
    write_report_html(out, rows, run_info(demo=True))
    return out


def test_report_escapes_text_and_links_only_existing_files(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;" in page
    assert "synthetic &lt;i&gt;" in page
    parser = LinkCollector()
    parser.feed(page)
    for link in parser.links:
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc, f"{link} would leave the disk"
        assert (report_dir / unquote(parsed.path)).is_file(), f"{link} does not exist"
    stem = safe_file_stem(TRICKY_ID)
    assert {f"{stem}_mosaic.png", f"{stem}.geojson", f"{stem}.csv", "plain.csv", "summary.csv", "run.json"} <= set(
        parser.links
    )
    assert "plain_mosaic.png" not in page and "plain.geojson" not in page  # not written, so not linked
    text = " ".join(parser.text)
    assert RESEARCH_NOTICE.upper() in text and "DEMO MODEL" in text and "demo.onnx" in text
    assert "0.500 [0.150\u20130.850]" in text
    assert "no mosaic" in text and "n/a" in text


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM} (Debian: apt-get install chromium)")
    page = (report_dir / "report.html").as_uri()
    flags = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1200,900",
    ]
    shot = tmp_path / "report.png"
    done = subprocess.run(flags + [f"--screenshot={shot}", page], capture_output=True, text=True, timeout=90)
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert image is not None, done.stderr[-2000:]
    assert image.shape[:2] == (900, 1200) and image.std() > 10, "the screenshot is blank"
    # the mosaic thumbnail is drawn: its dark background shows in the table area
    assert ((image < 40).all(axis=2)).sum() > 2000
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # script errors and blocked loads would be logged here
    dom = subprocess.run(flags + ["--dump-dom", page], capture_output=True, text=True, timeout=90)
    assert 'aria-sort="none"' in dom.stdout, "the sorting script did not run"
    assert not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_idc_infer_writes_review_outputs(tmp_path, demo_onnx):
    root = tmp_path / "cohort"
    write_cohort(root, n_patients=2, seed=7, grid=5)
    out = tmp_path / "out"
    args = [str(root), "--model", str(demo_onnx), "--out", str(out), "--review-scale", "0.5"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    parser = LinkCollector()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    for pid in ("90001", "90002"):
        mosaic = read_rgb(out / f"{pid}_mosaic.png")
        assert mosaic.shape[0] >= 125 and mosaic.shape[1] >= 2 * 125  # 250 px slide at 0.5, two panels
        rows = read_csv(out / f"{pid}.csv")
        features = json.loads((out / f"{pid}.geojson").read_text(encoding="utf-8"))["features"]
        assert len(features) == sum(r["status"] == "ok" for r in rows) == 25
        by_xy = {(int(r["x"]), int(r["y"])): r for r in rows}
        for feature in features:
            x, y = feature["geometry"]["coordinates"][0][0]
            prob_idc = feature["properties"]["measurements"]["prob_idc"]
            assert prob_idc == pytest.approx(float(by_xy[x, y]["prob_idc"]), abs=1e-6)
        assert f"{pid}_mosaic.png" in parser.links
    run_info_json = json.loads((out / "run.json").read_text())
    assert run_info_json["arguments"]["review"] is True and run_info_json["arguments"]["review_scale"] == 0.5


def test_no_review_writes_none(tmp_path, demo_onnx):
    root = tmp_path / "cohort"
    write_cohort(root, n_patients=1, seed=7, grid=4)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, [str(root), "--model", str(demo_onnx), "--out", str(out), "--no-review"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert (out / "90001.csv").exists()
    assert not list(out.glob("*_mosaic.png")) and not list(out.glob("*.geojson"))
    assert not (out / "report.html").exists()


def test_the_geojson_template_writes_exactly_what_json_dumps_writes():
    """GeoJsonSink writes features from a string template (faster); it must be byte-identical to the dict."""
    import json

    from idc_infer.review import patch_feature, patch_feature_json

    rows = [
        {
            "path": "0/8863_idx5_x51_y1251_class0.png",
            "x": 51,
            "y": 1251,
            "width_px": 50,
            "height_px": 50,
            "prob_idc": 0.123456789,
            "pred": 0,
            "label": 0,
        },
        {
            "path": 'odd "name"\\\u00e9.png',
            "x": 0,
            "y": 7,
            "width_px": None,
            "height_px": 32,
            "prob_idc": 1.0,
            "pred": 1,
            "label": None,
        },
        {
            "path": "slide.svs [x=802,y=401,w=401,h=401]",
            "x": 802,
            "y": 401,
            "width_px": 401,
            "height_px": 401,
            "prob_idc": 5e-07,
            "pred": 0,
            "label": 1,
        },
    ]
    for row in map(lambda values: PatchRow(**values), rows):
        for scale in (1.0, 16.0, 0.333):
            expected = json.dumps(patch_feature(row, "p1", scale), allow_nan=False, separators=(",", ":"))
            assert patch_feature_json(row, "p1", scale) == expected


def test_geojson_feature_ids_are_the_uuid5_of_patient_and_path():
    """Feature ids are computed without uuid objects (faster); QuPath keeps them across runs, so they must stay the
    uuid5 of "<patient>/<path>" for every name, including non-ASCII ones."""
    import uuid

    from idc_infer.geojson import FEATURE_NAMESPACE, feature_id

    names = ["8863/1/8863_idx5_x51_y1251_class1.png", 'p/\u00e9\u4e2d "q".png', "", "x" * 500, "s [x=0,y=0,w=1,h=1]"]
    for name in names:
        assert feature_id(name) == str(uuid.uuid5(FEATURE_NAMESPACE, name))


def test_patches_far_apart_give_a_coarser_mosaic_within_bounded_memory(tmp_path):
    """Two patches 24,000 px apart (a canvas of ~1 GB at scale 0.25 before): drawn at a smaller scale instead."""
    from idc_infer.review import MAX_MOSAIC_AREA_PX, MosaicCanvas

    canvas = MosaicCanvas(0.25)
    canvas.add_patch(1, 1, 50, 50, grey_patch(50, 50), 0.9, None)
    canvas.add_patch(24_001, 24_001, 50, 50, grey_patch(50, 50), 0.1, None)
    canvas.add_patch(1, 51, 50, 50, grey_patch(50, 50), 0.5, None)
    assert canvas.scale < 0.25 and canvas.n_scored == 3
    assert canvas.prob.size <= 2 * MAX_MOSAIC_AREA_PX and canvas.nbytes < 60 * 2**20
    # every patch is still where its coordinates say, at the new scale
    for x, y, prob in ((1, 1, 0.9), (24_001, 24_001, 0.1), (1, 51, 0.5)):
        c = int((x + 25) * canvas.scale) - canvas._origin[0]
        r = int((y + 25) * canvas.scale) - canvas._origin[1]
        assert canvas.prob[r, c] == pytest.approx(prob)
    sink = MosaicSink("p", tmp_path, "p", THRESHOLD, scale=0.25)
    sink.add(row_for(1, 1, 0.2), grey_patch(50, 50))
    sink.add(row_for(24_001, 24_001, 0.2), grey_patch(50, 50))
    sink.close()
    assert (tmp_path / "p_mosaic.png").exists()


def test_mosaic_png_changes_bytes_not_pixels_and_any_decoder_reads_it(tmp_path):
    """write_png encodes the mosaic itself (SUB-filtered rows deflated by ISA-L: 7-8x faster than libpng through
    cv2): the file's bytes differ from cv2's encoding, its pixels do not, for any shape; OpenCV and Pillow read it
    without a warning, and it is no more than a few percent larger than libpng's at zlib level 3."""
    import warnings

    from idc_infer.review import write_png

    Image = require_module("PIL.Image")  # noqa: N806 - the module, as PIL names it
    rng = np.random.default_rng(0)
    canvas = np.full((300, 900, 3), 255, np.uint8)  # a mosaic: patches on white, a heat panel beside them
    canvas[50:150, 100:400] = rng.integers(0, 256, (100, 300, 3), dtype=np.uint8)
    canvas[50:150, 500:800] = (200, 30, 60)
    for shape in ((1, 1, 3), (1, 9, 3), (9, 1, 3), (37, 53, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        write_png(tmp_path / "m.png", image)
        decoded = cv2.cvtColor(cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
        assert np.array_equal(decoded.reshape(shape), image), shape
    write_png(tmp_path / "m.png", canvas)
    data = (tmp_path / "m.png").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Image.open(tmp_path / "m.png") as opened:
            opened.load()
            assert np.array_equal(np.asarray(opened.convert("RGB")), canvas)
    assert np.array_equal(cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), -1), cv2.COLOR_BGR2RGB), canvas)
    ok, libpng = cv2.imencode(
        ".png",
        cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB],
    )
    assert ok and data != libpng.tobytes() and len(data) <= 1.1 * len(libpng)


def test_mosaic_drawn_in_batches_has_the_pixels_of_one_patch_at_a_time(tmp_path):
    """The sink sizes the canvas once per batch of patches (not patch by patch): the image must not change,
    with overlapping, failed, quality-skipped and far-apart patches among 2,500 arriving in scattered order."""
    from idc_infer.mosaic import MAX_PENDING_PATCHES, MosaicCanvas

    rng = np.random.default_rng(3)
    rows, pixels = [], []
    for i in range(2500):
        x, y = int(rng.integers(0, 4000)), int(rng.integers(0, 3000))
        status = ["ok", "ok", "ok", "corrupt", "background"][i % 5]
        prob = float(rng.random()) if status == "ok" else None
        rows.append(row_for(x, y, prob, label=int(rng.integers(0, 2)), status=status))
        pixels.append(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8) if status != "corrupt" else None)
    assert len(rows) > 2 * MAX_PENDING_PATCHES  # several batches, and a last partial one
    sink = MosaicSink("p", tmp_path, "p", THRESHOLD, scale=0.25)
    for row, rgb in zip(rows, pixels):
        sink.add(row, rgb)
    sink.close()
    one_by_one = MosaicCanvas(0.25)
    for row, rgb in zip(rows, pixels):
        scored = row.status == "ok"
        one_by_one.add_patch(
            row.x,
            row.y,
            50,
            50,
            rgb,
            row.prob_idc if scored else None,
            row.label,
            row.status != "corrupt" and not scored,
        )
    expected, _ = one_by_one.render("patient p", THRESHOLD)
    assert np.array_equal(read_rgb(tmp_path / "p_mosaic.png"), expected)


def test_the_ground_truth_caption_names_the_label_not_the_prediction():
    """The truth panel's white outline is the label; its caption said 'white outline = pred IDC'."""
    from idc_infer.mosaic import HEAT_TITLE, TRUTH_TITLE

    assert "label" in TRUTH_TITLE and "pred" not in TRUTH_TITLE
    assert "pred" in HEAT_TITLE


def test_report_of_one_patient_says_patient_not_patients(tmp_path):
    result = CliRunner().invoke(main, [str(SAMPLE_PATIENT), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "o" / "report.html").read_text(encoding="utf-8")
    assert "1 patient," in html and "1 patients" not in html


@pytest.mark.parametrize("layout", ["far patch last", "far patch first", "narrow edge patch", "slivers only"])
def test_batched_mosaic_equals_one_patch_at_a_time_when_the_scale_halves(tmp_path, layout):
    """Patches spread beyond the canvas limit halve the scale mid-patient: the batched sink must draw the same
    pixels and counts as one patch at a time (and must not give up where that draws a mosaic)."""
    from idc_infer.mosaic import MosaicCanvas

    rng = np.random.default_rng(5)
    rows = [row_for(1 + 50 * (i % 20), 1 + 50 * (i // 20), float(rng.random())) for i in range(400)]
    far = row_for(15_000, 15_000, 0.9)
    if layout == "far patch last":
        rows.append(far)
    elif layout == "far patch first":
        rows.insert(0, far)
    elif layout == "narrow edge patch":  # a 3 px wide edge patch must not stop the halving of the whole batch
        rows += [row_for(1001, 1, 0.4, width_px=3), row_for(4000, 2500, 0.7)]
    else:
        rows = [row_for(1 + 50 * i, 1, 0.5, width_px=2, height_px=2) for i in range(5)] + rows[:3]
    scale = 1.0 if layout == "narrow edge patch" else 0.25
    pixels = [rng.integers(0, 256, (r.height_px, r.width_px, 3), dtype=np.uint8) for r in rows]
    sink = MosaicSink("p", tmp_path, "p", THRESHOLD, scale=scale)
    for row, rgb in zip(rows, pixels):
        sink.add(row, rgb)
    sink.close()
    one_by_one = MosaicCanvas(scale)
    for row, rgb in zip(rows, pixels):
        one_by_one.add_patch(row.x, row.y, row.width_px, row.height_px, rgb, row.prob_idc, row.label)
    expected, _ = one_by_one.render("patient p", THRESHOLD)
    assert (tmp_path / "p_mosaic.png").exists(), "the batched sink gave up on a mosaic drawn one at a time"
    assert np.array_equal(read_rgb(tmp_path / "p_mosaic.png"), expected)
    assert (sink.canvas.n_scored, sink.canvas.n_failed) == (one_by_one.n_scored, one_by_one.n_failed)


def test_a_mosaic_sink_holds_a_bounded_number_of_bytes_of_pending_pixels(tmp_path):
    """Under a contract that resizes oversized images the rows carry their full pixels: the sink draws before
    holding more than MAX_PENDING_BYTES of them (1,024 images of 700x460 had taken 1.2 GB)."""
    from idc_infer.mosaic import MAX_PENDING_BYTES

    sink = MosaicSink("p", tmp_path, "p", THRESHOLD, scale=0.05)
    big = np.zeros((460, 700, 3), dtype=np.uint8)
    most = 0
    for i in range(200):
        sink.add(row_for(700 * (i % 10), 460 * (i // 10), 0.5, width_px=700, height_px=460), big)
        most = max(most, sum(p.rgb.nbytes for p in sink._pending))
    sink.close()
    assert most <= MAX_PENDING_BYTES + big.nbytes and (tmp_path / "p_mosaic.png").exists()


def test_heat_colours_are_the_jet_colour_map_of_each_probabilitys_rounded_level():
    """heat_rgb looks colours up in a table built from cv2's JET map (faster): every level, nan and out-of-range
    values must give what applyColorMap gives, in RGB order and the input's shape."""
    probs = np.concatenate([np.linspace(0.0, 1.0, 2001), [np.nan, -0.5, 1.5, 0.5 / 255, 1.5 / 255, 254.5 / 255]])
    levels = np.round(np.clip(np.nan_to_num(probs), 0.0, 1.0) * 255).astype(np.uint8)
    expected = cv2.applyColorMap(levels.reshape(-1, 1), cv2.COLORMAP_JET).reshape(-1, 3)[:, ::-1]
    np.testing.assert_array_equal(heat_rgb(probs), expected)
    assert heat_rgb(np.zeros((4, 5))).shape == (4, 5, 3) and heat_rgb(np.zeros((4, 5))).dtype == np.uint8
    np.testing.assert_array_equal(heat_rgb(0.7), heat_rgb(np.array([0.7]))[0])  # a scalar gives one colour
    np.testing.assert_array_equal(heat_rgb(np.array([0.0, 1.0])), [[0, 0, 128], [128, 0, 0]])  # blue to red


def test_overlay_colours_exactly_the_scored_pixels_of_a_sparse_canvas():
    """overlay_panel gathers and scatters the coloured pixels by index (faster than by mask): on a cropped (not
    contiguous) canvas with holes, it must give the pixels of the plain masked formula."""
    from idc_infer.mosaic import _MARK_NONE, _MARK_STROKE, overlay_panel

    rng = np.random.default_rng(3)
    canvas = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    values = np.where(rng.random((90, 130)) < 0.2, rng.random((90, 130)), np.nan)
    marks = np.where(rng.random((90, 130)) < 0.01, _MARK_STROKE, _MARK_NONE).astype(np.uint8)
    tissue, prob, mark = canvas[5:80, 7:120], values[5:80, 7:120], marks[5:80, 7:120]
    assert not tissue.flags.c_contiguous
    got = overlay_panel(tissue, prob, prob >= 0.5, mark)
    known = ~np.isnan(prob)
    expected = tissue.copy()
    expected[known] = blend(tissue[known], heat_rgb(prob[known]))
    contours, _ = cv2.findContours(((prob >= 0.5) & known).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(expected, contours, -1, MARK_RGB, 1)
    expected[mark == _MARK_STROKE] = MARK_RGB
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(tissue, canvas[5:80, 7:120])  # the canvas itself is left as it was


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="only Linux file systems take names that are not UTF-8"
)
def test_a_patient_folder_named_in_bytes_that_are_not_utf8_gets_its_reports(tmp_path):
    """A folder name that is not UTF-8 (copied from an old Windows share, say) reaches Python surrogate-escaped;
    the GeoJSON feature ids hashed it with uuid5, which raised, and the whole run stopped with a traceback."""
    import os
    import re
    import uuid

    from idc_infer.geojson import FEATURE_NAMESPACE, feature_id

    cohort = tmp_path / "cohort"
    write_patient(cohort, "p1", grid=3)
    odd = os.fsdecode(b"p\xff")
    (cohort / "p1").rename(cohort / odd)
    for attempt in ("a", "b"):
        result = CliRunner().invoke(main, [str(cohort), "--out", str(tmp_path / attempt)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "p\\xff\tpatches 9" in result.output  # the console names it by its bytes
    stem = safe_file_stem(odd)
    ids = [f["id"] for f in json.loads((tmp_path / "a" / f"{stem}.geojson").read_text())["features"]]
    assert ids and all(
        re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", i) for i in ids
    )
    assert (tmp_path / "a" / f"{stem}.geojson").read_bytes() == (tmp_path / "b" / f"{stem}.geojson").read_bytes()
    assert len({*ids}) == len(ids)
    assert feature_id("p1/x.png") == str(uuid.uuid5(FEATURE_NAMESPACE, "p1/x.png"))  # valid names: unchanged ids
