"""Review outputs a pathologist looks at: IDC heatmap mosaic PNG, QuPath GeoJSON and a cohort report.html."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import cv2
import numpy as np

from .files import RESEARCH_NOTICE, atomic_path, safe_file_stem
from .quality import QC_STATUSES
from .quantify import ESTIMATOR_COLUMNS, ESTIMATOR_TEXT, ESTIMATOR_TITLES

if TYPE_CHECKING:
    from .engine import SinkFactory

log = logging.getLogger(__name__)

DEFAULT_REVIEW_SCALE = 0.25  # a 50 px Kaggle patch becomes ~12 px: a whole slide stays a few hundred kB
NOMINAL_PATCH_PX = 50  # size drawn for a failed patch, whose own size may be unknown or absurd
# Real Kaggle slides span a few thousand px; a file name claiming x=10**9 must not allocate gigabytes.
MAX_MOSAIC_SIDE_PX = 6000
# beyond this many canvas pixels (9 bytes each) the mosaic is drawn at half the scale, and so on, while a patch
# stays at least MIN_PATCH_CANVAS_PX wide: memory stays bounded (two patches 24k px apart took ~1 GB before)
MAX_MOSAIC_AREA_PX = 4_000_000
MIN_PATCH_CANVAS_PX = 2
_GROWTH_SLACK_MAX_PX = 1024  # canvas growth is amortised, but never by more than this per side
HEAT_ALPHA = 0.45  # heat colour weight; the tissue under it must stay readable
HEAT_COLORMAP = cv2.COLORMAP_JET  # blue (0) -> red (1), the heat scale readers already know
BACKGROUND_RGB = (28, 28, 28)  # no patch here: dark, so it cannot be mistaken for pale fat
FAILED_RGB = (128, 128, 128)
MARK_RGB = (255, 255, 255)
TEXT_RGB = (235, 235, 235)
IDC_RGB = (200, 0, 0)  # QuPath's own "Tumor" class colour
NON_IDC_RGB = (40, 120, 220)
MOSAIC_SUFFIX = "_mosaic.png"
GEOJSON_SUFFIX = ".geojson"
REPORT_NAME = "report.html"
GEOJSON_FRAME_SLIDE = "level-0 pixels of the slide (x right, y down): drag onto the slide in QuPath"
GEOJSON_FRAME_PATCHES = (
    "pixels of the image the patches were cut from, as their file names give x, y (for the "
    "public set: its 2.5x images, not the scan's level 0); --geojson-scale maps them to level 0"
)
GEOJSON_FRAME_SCALED = (
    "file-name x, y and patch size multiplied by {scale:g} (--geojson-scale): level-0 pixels of the scan"
)
# uuid5 namespace for feature ids: the same patch gets the same id in every run
FEATURE_NAMESPACE = uuid.UUID("5d0c1f3e-8a1b-4f1e-9a6b-2f1c8e7d4a10")

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.4
_LINE_PX = 16
_PAD_PX = 10
_BAR_WIDTH_PX = 14
_BAR_MIN_HEIGHT_PX = 100

# canvas codes for failed patches: a grey fill crossed by a white X
_MARK_NONE, _MARK_FILL, _MARK_STROKE = 0, 1, 2


def slide_to_canvas_px(value: float, scale: float) -> int:
    """A slide coordinate on the absolute mosaic grid.

    Both edges of every patch go through this one mapping, so neighbouring patches tile without
    gaps or overlaps whatever the scale; the epsilon keeps 0.29 * 100 from flooring to 28.
    """
    return int(math.floor(value * scale + 1e-6))


def heat_rgb(prob: np.ndarray) -> np.ndarray:
    """The heatmap colour (uint8 RGB, shape prob.shape + (3,)) of probabilities in [0, 1]."""
    prob = np.asarray(prob, dtype=np.float64)
    levels = np.round(np.clip(np.nan_to_num(prob), 0.0, 1.0) * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(levels.reshape(-1, 1), HEAT_COLORMAP)
    return bgr.reshape(prob.shape + (3,))[..., ::-1].copy()


def blend(under: np.ndarray, over: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """``over`` laid on ``under`` with weight ``alpha`` (uint8 in, uint8 out)."""
    mixed = under.astype(np.float32) * (1.0 - alpha) + over.astype(np.float32) * alpha
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class MosaicLayout:
    """Where things are in a written mosaic, to map slide coordinates onto its pixels."""

    scale: float
    origin_px: tuple[int, int]  # absolute grid pixel (col, row) shown at each panel's top-left
    panel_size_px: tuple[int, int]  # (width, height) of each panel
    heat_xy: tuple[int, int]  # top-left of the heatmap panel in the image
    truth_xy: tuple[int, int] | None  # top-left of the ground-truth panel, None without labels
    image_size_px: tuple[int, int]

    def image_px(self, x: float, y: float, panel: str = "heat") -> tuple[int, int]:
        """Image pixel (col, row) of slide point (x, y) in the ``heat`` or ``truth`` panel."""
        corner = self.heat_xy if panel == "heat" else self.truth_xy
        if corner is None:
            raise ValueError("this mosaic has no ground-truth panel (no patch had a label)")
        left, top = corner
        return (
            left + slide_to_canvas_px(x, self.scale) - self.origin_px[0],
            top + slide_to_canvas_px(y, self.scale) - self.origin_px[1],
        )


def _regrow(array: np.ndarray, fill: Any, shape: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    grown = np.empty(shape + array.shape[2:], dtype=array.dtype)
    grown[...] = fill
    rows, cols = array.shape[:2]
    grown[offset[0] : offset[0] + rows, offset[1] : offset[1] + cols] = array
    return grown


class MosaicTooLarge(ValueError):
    """The patches' coordinates span more than MAX_MOSAIC_SIDE_PX at the output scale."""


class MosaicCanvas:
    """Tissue, prob_idc, labels and failure marks at the output scale, grown as patches arrive.

    Nothing per patch is kept: memory is the slide's area times scale squared (plus bounded
    growth slack), however many patches the slide has.
    """

    def __init__(self, scale: float):
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self._origin = (0, 0)  # absolute grid pixel (col, row) of canvas element [0, 0]
        self.tissue: np.ndarray = np.empty((0, 0, 3), dtype=np.uint8)  # cv2.resize replaces it with its own type
        self.prob = np.empty((0, 0), dtype=np.float32)  # nan: not scored
        self.label = np.empty((0, 0), dtype=np.int8)  # -1: unknown
        self.marks = np.empty((0, 0), dtype=np.uint8)
        self.bounds: tuple[int, int, int, int] | None = None  # (c0, r0, c1, r1) absolute, of all drawn
        self.n_scored = 0
        self.n_failed = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.tissue, self.prob, self.label, self.marks))

    def _ensure(self, c0: int, r0: int, c1: int, r1: int) -> None:
        """Pad the canvas so it covers [c0, c1) x [r0, r1); grows by half again to amortise copies."""
        rows, cols = self.prob.shape
        oc, orow = self._origin
        if rows and c0 >= oc and r0 >= orow and c1 <= oc + cols and r1 <= orow + rows:
            return
        if not rows:
            new_c0, new_r0, new_c1, new_r1 = c0, r0, c1, r1
        else:

            def grow(need: int, size: int) -> int:
                return 0 if need <= 0 else max(need, min(size // 2, _GROWTH_SLACK_MAX_PX))

            new_c0 = oc - grow(oc - c0, cols)
            new_r0 = orow - grow(orow - r0, rows)
            new_c1 = oc + cols + grow(c1 - (oc + cols), cols)
            new_r1 = orow + rows + grow(r1 - (orow + rows), rows)
        shape = (new_r1 - new_r0, new_c1 - new_c0)
        offset = (orow - new_r0, oc - new_c0) if rows else (0, 0)
        self.tissue = _regrow(self.tissue, BACKGROUND_RGB, shape, offset)
        self.prob = _regrow(self.prob, np.nan, shape, offset)
        self.label = _regrow(self.label, -1, shape, offset)
        self.marks = _regrow(self.marks, _MARK_NONE, shape, offset)
        self._origin = (new_c0, new_r0)

    def _halve(self) -> None:
        """Draw at half the scale from now on: every layer downsampled 2:1 on the absolute grid."""
        oc, orow = self._origin
        pad_c, pad_r = oc % 2, orow % 2  # start on an even absolute pixel, so (a // 2) maps every pixel
        rows, cols = self.prob.shape
        shape = (rows + pad_r + (rows + pad_r) % 2, cols + pad_c + (cols + pad_c) % 2)
        offset = (pad_r, pad_c)
        tissue = _regrow(self.tissue, BACKGROUND_RGB, shape, offset)
        self.tissue = cv2.resize(tissue, (shape[1] // 2, shape[0] // 2), interpolation=cv2.INTER_AREA)
        self.prob = _regrow(self.prob, np.nan, shape, offset)[::2, ::2].copy()
        self.label = _regrow(self.label, -1, shape, offset)[::2, ::2].copy()
        self.marks = _regrow(self.marks, _MARK_NONE, shape, offset)[::2, ::2].copy()
        self._origin = ((oc - pad_c) // 2, (orow - pad_r) // 2)
        if self.bounds is not None:
            c0, r0, c1, r1 = self.bounds
            self.bounds = (c0 // 2, r0 // 2, -(-c1 // 2), -(-r1 // 2))
        self.scale /= 2

    def add_patch(
        self,
        x: int,
        y: int,
        width_px: int,
        height_px: int,
        rgb: np.ndarray | None,
        prob_idc: float | None,
        label: int | None,
        skipped: bool = False,
    ) -> None:
        """Draw one patch; ``prob_idc`` None marks it failed, unless ``skipped`` (quality control: glass or
        blurred), which is drawn as tissue without a heat colour or a failure mark."""
        failed = prob_idc is None and not skipped
        self.n_failed += failed
        self.n_scored += prob_idc is not None
        while True:
            c0, r0 = slide_to_canvas_px(x, self.scale), slide_to_canvas_px(y, self.scale)
            c1, r1 = slide_to_canvas_px(x + width_px, self.scale), slide_to_canvas_px(y + height_px, self.scale)
            if c1 <= c0 or r1 <= r0:
                return  # a sliver thinner than one output pixel at this scale
            b = self.bounds
            bounds = (c0, r0, c1, r1) if b is None else (min(b[0], c0), min(b[1], r0), max(b[2], c1), max(b[3], r1))
            if (bounds[2] - bounds[0]) * (bounds[3] - bounds[1]) <= MAX_MOSAIC_AREA_PX or self.scale * min(
                width_px, height_px
            ) / 2 < MIN_PATCH_CANVAS_PX:
                break
            self._halve()  # patches spread far apart: a coarser mosaic, not unbounded memory
            log.info("mosaic drawn at scale %g to stay within %d pixels", self.scale, MAX_MOSAIC_AREA_PX)
        if (
            max(bounds[2] - bounds[0], bounds[3] - bounds[1]) > MAX_MOSAIC_SIDE_PX
            or (bounds[2] - bounds[0]) * (bounds[3] - bounds[1]) > MAX_MOSAIC_AREA_PX
        ):
            raise MosaicTooLarge(
                f"patch coordinates span {bounds[2] - bounds[0]}x{bounds[3] - bounds[1]} px at scale {self.scale:g}, "
                f"more than {MAX_MOSAIC_SIDE_PX} px a side or {MAX_MOSAIC_AREA_PX} px in all"
            )
        self._ensure(c0, r0, c1, r1)
        self.bounds = bounds
        cells = (slice(r0 - self._origin[1], r1 - self._origin[1]), slice(c0 - self._origin[0], c1 - self._origin[0]))
        size = (c1 - c0, r1 - r0)
        if failed:
            self.tissue[cells] = FAILED_RGB
            self.prob[cells] = np.nan
            cross = np.full(size[::-1], _MARK_FILL, dtype=np.uint8)
            cv2.line(cross, (0, 0), (size[0] - 1, size[1] - 1), _MARK_STROKE, 1)
            cv2.line(cross, (size[0] - 1, 0), (0, size[1] - 1), _MARK_STROKE, 1)
            self.marks[cells] = cross
        else:
            if rgb is not None:
                self.tissue[cells] = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            self.prob[cells] = np.nan if prob_idc is None else prob_idc
            self.marks[cells] = _MARK_NONE
        self.label[cells] = -1 if label is None else label

    def _cropped(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        assert self.bounds is not None  # render checks a patch was drawn
        c0, r0, c1, r1 = self.bounds
        oc, orow = self._origin
        cells = (slice(r0 - orow, r1 - orow), slice(c0 - oc, c1 - oc))
        return self.tissue[cells], self.prob[cells], self.label[cells], self.marks[cells]

    def render(self, title: str, threshold: float) -> tuple[np.ndarray, MosaicLayout]:
        """The mosaic image (uint8 RGB): heatmap panel, ground-truth panel where labels are known, colour bar."""
        if self.bounds is None:
            raise ValueError("nothing to render: no patch with coordinates was added")
        tissue, prob, label, marks = self._cropped()
        heat = overlay_panel(tissue, prob, prob >= threshold, marks)
        has_labels = bool((label >= 0).any())
        truth = None
        if has_labels:
            known = np.where(label >= 0, label.astype(np.float32), np.nan)
            truth = overlay_panel(tissue, known, label == 1, marks)
        header = [
            title,
            f"{self.n_scored} scored, {self.n_failed} failed | pred IDC at prob_idc >= {threshold:.3f} "
            f"| scale {self.scale:g}",
            RESEARCH_NOTICE.upper(),
        ]
        return compose(
            heat,
            truth,
            header,
            threshold,
            show_failed=bool((marks != _MARK_NONE).any()),
            scale=self.scale,
            origin_px=(self.bounds[0], self.bounds[1]),
        )


def _outline(panel: np.ndarray, mask: np.ndarray) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(panel, contours, -1, MARK_RGB, 1)


def overlay_panel(tissue: np.ndarray, values: np.ndarray, outline: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Tissue with the heat colour of ``values`` (nan: none) blended on, ``outline`` traced, failures crossed."""
    panel = tissue.copy()
    known = ~np.isnan(values)
    panel[known] = blend(tissue[known], heat_rgb(values[known]))
    _outline(panel, outline & known)
    panel[marks == _MARK_STROKE] = MARK_RGB
    return panel


def _ascii(text: str) -> str:
    # Hershey fonts draw ASCII only; anything else would come out as '?' anyway
    return text.encode("ascii", "replace").decode("ascii")


def _text_width_px(text: str) -> int:
    return cv2.getTextSize(_ascii(text), _FONT, _FONT_SCALE, 1)[0][0]


def _put_text(image: np.ndarray, text: str, left: int, baseline: int, colour=TEXT_RGB) -> None:
    cv2.putText(image, _ascii(text), (left, baseline), _FONT, _FONT_SCALE, colour, 1, cv2.LINE_AA)


def colour_bar(height_px: int) -> np.ndarray:
    """A vertical bar of the heat colours, prob_idc 1 at the top and 0 at the bottom."""
    prob = np.linspace(1.0, 0.0, height_px)[:, None].repeat(_BAR_WIDTH_PX, axis=1)
    return heat_rgb(prob)


def compose(
    heat: np.ndarray,
    truth: np.ndarray | None,
    header: list[str],
    threshold: float,
    show_failed: bool,
    scale: float,
    origin_px: tuple[int, int],
) -> tuple[np.ndarray, MosaicLayout]:
    """Lay out header, panels side by side and the colour bar with its ticks on one image."""
    panel_h, panel_w = heat.shape[:2]
    top = _PAD_PX + _LINE_PX * len(header) + _LINE_PX  # header lines, then one line of panel titles
    # each panel says what its own white outline marks (the truth panel's is the label, not the prediction)
    heat_title, truth_title = "model: prob_idc (outline: pred IDC)", "ground truth (outline: IDC label)"
    heat_xy = (_PAD_PX, top)
    # a small patient's panel is narrower than its title: the next panel starts after whichever is wider
    heat_right = heat_xy[0] + max(panel_w, _text_width_px(heat_title))
    truth_xy = (heat_right + 2 * _PAD_PX, top) if truth is not None else None
    titles_right = (truth_xy[0] + max(panel_w, _text_width_px(truth_title))) if truth_xy else heat_right
    bar_left = titles_right + 2 * _PAD_PX
    bar_h = max(panel_h, _BAR_MIN_HEIGHT_PX)
    threshold_row = int(round((1.0 - threshold) * (bar_h - 1)))
    # a round tick whose label would overprint the threshold's is left out; the threshold matters more
    ticks = [
        (v, t)
        for v, t in ((1.0, "1.0"), (0.5, "0.5"), (0.0, "0.0"))
        if abs(int(round((1.0 - v) * (bar_h - 1))) - threshold_row) >= 12
    ]
    ticks.append((threshold, f"thr {threshold:.2f}"))
    legend = [("no patch", BACKGROUND_RGB)] + ([("failed", FAILED_RGB)] if show_failed else [])
    labels_w = max(_text_width_px(t) for _, t in ticks) + 8
    legend_w = _BAR_WIDTH_PX + 6 + max(_text_width_px(t) for t, _ in legend)
    width = max(
        bar_left + max(_BAR_WIDTH_PX + labels_w, legend_w) + _PAD_PX,
        _PAD_PX + max(_text_width_px(line) for line in header) + _PAD_PX,
    )
    legend_top = top + bar_h + _LINE_PX
    height = max(top + panel_h, legend_top + _LINE_PX * len(legend)) + _PAD_PX
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[...] = (12, 12, 12)

    for i, line in enumerate(header):
        _put_text(image, line, _PAD_PX, _PAD_PX + _LINE_PX * (i + 1) - 4)
    _put_text(image, heat_title, heat_xy[0], top - 5)
    image[top : top + panel_h, heat_xy[0] : heat_xy[0] + panel_w] = heat
    if truth is not None and truth_xy is not None:  # truth_xy is set exactly when there is a truth panel
        _put_text(image, truth_title, truth_xy[0], top - 5)
        image[top : top + panel_h, truth_xy[0] : truth_xy[0] + panel_w] = truth

    image[top : top + bar_h, bar_left : bar_left + _BAR_WIDTH_PX] = colour_bar(bar_h)
    for value, text in ticks:
        row = top + int(round((1.0 - value) * (bar_h - 1)))
        colour = MARK_RGB if text.startswith("thr") else TEXT_RGB
        cv2.line(image, (bar_left + _BAR_WIDTH_PX, row), (bar_left + _BAR_WIDTH_PX + 4, row), colour, 1)
        # a label at the very top would touch the bar's title above it: keep labels below the bar's top
        _put_text(image, text, bar_left + _BAR_WIDTH_PX + 7, max(row + 4, top + 9), colour)
    _put_text(image, "prob_idc", bar_left, top - 5)
    for i, (text, swatch) in enumerate(legend):
        row = legend_top + _LINE_PX * i
        cv2.rectangle(image, (bar_left, row - 10), (bar_left + _BAR_WIDTH_PX - 1, row), swatch, -1)
        cv2.rectangle(image, (bar_left, row - 10), (bar_left + _BAR_WIDTH_PX - 1, row), (90, 90, 90), 1)
        if text == "failed":
            cv2.line(image, (bar_left, row - 10), (bar_left + _BAR_WIDTH_PX - 1, row), MARK_RGB, 1)
            cv2.line(image, (bar_left + _BAR_WIDTH_PX - 1, row - 10), (bar_left, row), MARK_RGB, 1)
        _put_text(image, text, bar_left + _BAR_WIDTH_PX + 6, row)

    layout = MosaicLayout(scale, origin_px, (panel_w, panel_h), heat_xy, truth_xy, (width, height))
    return image, layout


def write_png(target: Path, rgb: np.ndarray) -> None:
    # an explicit zlib level 3 writes ~40% smaller files than cv2's default settings, no slower
    # the SUB filter: 0.58x the encoding time of the adaptive filters on a 616x1377 mosaic, 7% larger, same pixels
    ok, encoded = cv2.imencode(
        ".png",
        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB],
    )
    if not ok:
        raise OSError(f"could not encode {target.name} as PNG")
    with atomic_path(target, "wb") as handle:
        handle.write(encoded.tobytes())


def _patch_size_px(row: dict, scored: bool) -> tuple[int, int]:
    width, height = row.get("width_px"), row.get("height_px")
    if scored and width and height:
        return int(width), int(height)
    # a failed patch: its own size if plausible, else the nominal one, so it cannot cover neighbours
    return min(int(width or NOMINAL_PATCH_PX), NOMINAL_PATCH_PX), min(int(height or NOMINAL_PATCH_PX), NOMINAL_PATCH_PX)


class MosaicSink:
    """Writes ``<stem>_mosaic.png``: the patient's tissue rebuilt from its patches, with the IDC heatmap."""

    def __init__(
        self,
        patient_id: str,
        out_dir: Path,
        stem: str,
        threshold: float,
        scale: float = DEFAULT_REVIEW_SCALE,
        frame_scale: float = 1.0,
    ):
        self.patient_id = patient_id
        self.threshold = threshold
        self.path = Path(out_dir) / f"{stem}{MOSAIC_SUFFIX}"
        # scale is per patch pixel: a slide's rows are in level-0 pixels, frame_scale of them per patch pixel
        self.canvas: MosaicCanvas | None = MosaicCanvas(scale / frame_scale)
        self.n_without_xy = 0
        self.layout: MosaicLayout | None = None

    def add(self, row: dict, rgb: np.ndarray | None) -> None:
        if self.canvas is None:
            return  # given up on this patient's mosaic
        if row.get("x") is None or row.get("y") is None:
            self.n_without_xy += 1  # no position on the slide: nothing to place
            return
        scored = row.get("status") == "ok" and row.get("prob_idc") is not None
        skipped = row.get("status") in QC_STATUSES
        width_px, height_px = _patch_size_px(row, scored or skipped)
        try:
            self.canvas.add_patch(
                int(row["x"]),
                int(row["y"]),
                width_px,
                height_px,
                rgb,
                float(row["prob_idc"]) if scored else None,
                row.get("label"),
                skipped,
            )
        except MosaicTooLarge as exc:
            # the CSV and GeoJSON still hold every patch; only the picture is skipped
            log.warning("patient %s: no mosaic: %s (lower --review-scale)", self.patient_id, exc)
            self.canvas = None

    def abort(self) -> None:
        self.canvas = None  # the run stopped mid-patient: write nothing

    def close(self) -> None:
        if self.canvas is None or self.canvas.bounds is None:
            # no placeable patch: a mosaic left by an earlier run would now describe other data
            self.path.unlink(missing_ok=True)
            return
        image, self.layout = self.canvas.render(f"patient {self.patient_id}", self.threshold)
        write_png(self.path, image)


def _scaled(value: float, scale: float) -> int | float:
    scaled = value * scale
    return int(scaled) if float(scaled).is_integer() else round(scaled, 3)


def patch_feature(row: dict, patient_id: str, scale: float = 1.0) -> dict:
    """One scored patch as a QuPath tile Feature: a closed square ring at its slide x/y (times ``scale``)."""
    x, y = _scaled(int(row["x"]), scale), _scaled(int(row["y"]), scale)
    width = _scaled(int(row.get("width_px") or NOMINAL_PATCH_PX), scale)
    height = _scaled(int(row.get("height_px") or NOMINAL_PATCH_PX), scale)
    pred = int(row["pred"])
    measurements: dict[str, float | int] = {"prob_idc": round(float(row["prob_idc"]), 6), "pred": pred}
    if row.get("label") is not None:
        measurements["label"] = int(row["label"])
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(FEATURE_NAMESPACE, f"{patient_id}/{row['path']}")),
        "geometry": {
            "type": "Polygon",
            # counter-clockwise with y up, as RFC 7946 asks; QuPath (y down) accepts either way
            "coordinates": [[[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]]],
        },
        "properties": {
            "objectType": "tile",
            "name": str(row["path"]),
            "classification": {"name": "IDC", "color": list(IDC_RGB)}
            if pred
            else {"name": "non-IDC", "color": list(NON_IDC_RGB)},
            "isLocked": True,
            "measurements": measurements,
        },
    }


_IDC_CLASS = json.dumps({"name": "IDC", "color": list(IDC_RGB)}, separators=(",", ":"))
_NON_IDC_CLASS = json.dumps({"name": "non-IDC", "color": list(NON_IDC_RGB)}, separators=(",", ":"))


def patch_feature_json(row: dict, patient_id: str, scale: float = 1.0) -> str:
    """json.dumps(patch_feature(...), separators=(",", ":")), byte for byte, from a string template: a third
    of the time per feature (a test holds the two equal)."""
    x, y = _scaled(int(row["x"]), scale), _scaled(int(row["y"]), scale)
    width = _scaled(int(row.get("width_px") or NOMINAL_PATCH_PX), scale)
    height = _scaled(int(row.get("height_px") or NOMINAL_PATCH_PX), scale)
    x1, y1 = x + width, y + height
    pred = int(row["pred"])
    prob = round(float(row["prob_idc"]), 6)
    if not math.isfinite(prob):
        raise ValueError(f"prob_idc {prob} is not a number")
    label = "" if row.get("label") is None else f',"label":{int(row["label"])}'
    feature_id = uuid.uuid5(FEATURE_NAMESPACE, f"{patient_id}/{row['path']}")
    return (
        f'{{"type":"Feature","id":"{feature_id}","geometry":{{"type":"Polygon","coordinates":[[[{x!r},{y!r}],'
        f'[{x1!r},{y!r}],[{x1!r},{y1!r}],[{x!r},{y1!r}],[{x!r},{y!r}]]]}},"properties":{{"objectType":"tile",'
        f'"name":{json.dumps(str(row["path"]))},"classification":{_IDC_CLASS if pred else _NON_IDC_CLASS},'
        f'"isLocked":true,"measurements":{{"prob_idc":{prob!r},"pred":{pred}{label}}}}}}}'
    )


class GeoJsonSink:
    """Writes ``<stem>.geojson``, a FeatureCollection QuPath imports, one tile per scored patch.

    Features stream into an anonymous temp file (gone by itself if the run dies) and are copied
    into place atomically on close, so a patient with many patches costs no memory.
    """

    def __init__(
        self,
        patient_id: str,
        out_dir: Path,
        stem: str,
        threshold: float,
        frame_scale: float = 1.0,
        geojson_scale: float | None = None,
    ):
        self.patient_id = patient_id
        self.path = Path(out_dir) / f"{stem}{GEOJSON_SUFFIX}"
        # a slide's rows are level-0 pixels already (frame_scale != 1); patch-folder coordinates are multiplied
        # by --geojson-scale (level-0 pixels of the scan per patch pixel) when given
        self.level0 = frame_scale != 1.0
        self.scale = 1.0 if self.level0 or geojson_scale is None else float(geojson_scale)
        self.frame = (
            GEOJSON_FRAME_SLIDE
            if self.level0
            else GEOJSON_FRAME_PATCHES
            if geojson_scale is None
            else GEOJSON_FRAME_SCALED.format(scale=self.scale)
        )
        self._spool = tempfile.TemporaryFile("w+", encoding="utf-8", dir=out_dir)
        self.n_features = 0

    def add(self, row: dict, rgb: np.ndarray | None) -> None:
        if row.get("x") is None or row.get("y") is None or row.get("status") != "ok" or row.get("prob_idc") is None:
            return
        if self.n_features:
            self._spool.write(",\n")
        self._spool.write(patch_feature_json(row, self.patient_id, self.scale))
        self.n_features += 1

    def abort(self) -> None:
        self._spool.close()  # the run stopped mid-patient: write nothing

    def close(self) -> None:
        try:
            with atomic_path(self.path) as out:
                # RFC 7946 foreign member: what frame the coordinates are in, and the research-use notice
                header = {"frame": self.frame, "scale": self.scale, "notice": RESEARCH_NOTICE}
                out.write('{"type":"FeatureCollection","idc":' + json.dumps(header) + ',"features":[\n')
                self._spool.seek(0)
                shutil.copyfileobj(self._spool, out)
                out.write("\n]}\n")
        finally:
            self._spool.close()


def review_sink_factories(scale: float = DEFAULT_REVIEW_SCALE, geojson_scale: float | None = None) -> list[SinkFactory]:
    """The per-patient review sinks for engine.RunSettings.sink_factories."""
    return [partial(MosaicSink, scale=scale), partial(GeoJsonSink, geojson_scale=geojson_scale)]


# --- report.html -------------------------------------------------------------------------------

_REPORT_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#1a1a1a}
h1{font-size:1.4em;margin:0 0 .3em}
.notice{background:#fde8e8;border:1px solid #c81e1e;color:#7a0e0e;padding:.5em .8em;font-weight:600;margin:.5em 0}
.demo{background:#fff4d6;border:1px solid #b7791f;color:#6b4100;padding:.5em .8em;font-weight:600;margin:.5em 0}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:.15em 1em;margin:1em 0}
dl.meta dt{font-weight:600}dl.meta dd{margin:0;word-break:break-all}
table{border-collapse:collapse;margin-top:1em}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:right;vertical-align:middle}
td{white-space:nowrap}
td.id,th.id{text-align:left}
td.notes{white-space:normal;text-align:left;min-width:18em;max-width:28em;font-size:.9em}
th.headline{background:#e8f0fe}
thead th{background:#f0f0f0;position:sticky;top:0}
th[aria-sort]{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tfoot td{font-weight:600;background:#fafafa}
img.thumb{max-width:240px;max-height:180px;display:block;background:#1c1c1c}
.na{color:#888}
"""

# Sorting by clicking a header; rows carry their sort keys in data-sort, so shown text can be formatted.
_REPORT_JS = """
(function(){
  var table=document.getElementById('cohort');if(!table)return;
  var body=table.tBodies[0];
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th){
    if(!th.dataset.type)return;
    th.setAttribute('aria-sort','none');th.tabIndex=0;
    function sort(){
      var asc=th.getAttribute('aria-sort')!=='ascending', col=th.cellIndex, num=th.dataset.type==='num';
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        var x=a.cells[col].dataset.sort, y=b.cells[col].dataset.sort;
        if(x===''||x===undefined)return 1; if(y===''||y===undefined)return -1;
        var d=num?parseFloat(x)-parseFloat(y):x.localeCompare(y,undefined,{numeric:true});
        return asc?d:-d;
      });
      rows.forEach(function(r){body.appendChild(r);});
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(o){
        if(o.dataset.type)o.setAttribute('aria-sort','none');
      });
      th.setAttribute('aria-sort',asc?'ascending':'descending');
    }
    th.addEventListener('click',sort);
    th.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();sort();}});
  });
})();
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, empty and nan cells."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _num_cell(value: Any, digits: int = 3) -> str:
    number = _number(value)
    if number is None:
        return '<td data-sort=""><span class="na">n/a</span></td>'
    shown = f"{number:.{digits}f}" if digits else f"{int(number)}"
    return f'<td data-sort="{number!r}">{shown}</td>'


def _fraction_cell(row: dict, column: str = "idc_fraction") -> str:
    fraction = _number(row.get(column))
    if fraction is None:
        return '<td data-sort=""><span class="na">n/a</span></td>'
    low, high = _number(row.get(f"{column}_ci95_low")), _number(row.get(f"{column}_ci95_high"))
    interval = f" [{low:.3f}&ndash;{high:.3f}]" if low is not None and high is not None else ""
    return f'<td data-sort="{fraction!r}">{fraction:.3f}{interval}</td>'


def _link_if_exists(out_dir: Path, name: str, text: str) -> str:
    if not (out_dir / name).is_file():
        return ""
    return f'<a href="{_esc(quote(name))}">{_esc(text)}</a>'


def _estimator_order(headline: str) -> list[str]:
    """The headline estimator first, then the others in their usual order."""
    return [headline] + [name for name in ESTIMATOR_COLUMNS if name != headline]


def _patient_row(out_dir: Path, row: dict, labelled: bool, is_cohort: bool, headline: str = "counted") -> str:
    patient_id = str(row.get("patient_id", ""))
    cells = [f'<td class="id" data-sort="{_esc(patient_id)}">{_esc(patient_id)}</td>']
    if is_cohort:
        cells.append("<td></td>")
    else:
        stem = safe_file_stem(patient_id)
        mosaic = f"{stem}{MOSAIC_SUFFIX}"
        if (out_dir / mosaic).is_file():
            href = _esc(quote(mosaic))
            cells.append(
                f'<td><a href="{href}"><img class="thumb" src="{href}" loading="lazy" '
                f'alt="mosaic of patient {_esc(patient_id)}"></a></td>'
            )
        else:
            cells.append('<td><span class="na">no mosaic</span></td>')
    cells += [_num_cell(row.get(k), 0) for k in ("n_patches", "n_scored", "n_failed")]
    for name in _estimator_order(headline):
        cells.append(_fraction_cell(row, ESTIMATOR_COLUMNS[name]))
    cells.append(_num_cell(row.get("mean_prob_idc")))
    notes = str(row.get("notes") or "")
    cells.append(f'<td class="notes">{_esc(notes)}</td>' if notes else "<td></td>")
    if labelled:
        metrics = ("true_idc_fraction", "sensitivity", "specificity", "balanced_accuracy")
        cells += [_num_cell(row.get(k)) for k in metrics]
    if is_cohort:
        links = [_link_if_exists(out_dir, "summary.csv", "summary.csv")]
    else:
        stem = safe_file_stem(patient_id)
        links = [
            _link_if_exists(out_dir, f"{stem}.csv", "CSV"),
            _link_if_exists(out_dir, f"{stem}{GEOJSON_SUFFIX}", "GeoJSON"),
        ]
    cells.append('<td class="id">' + " ".join(link for link in links if link) + "</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def _counted(n: Any, one: str, many: str | None = None) -> str:
    """'1 patient', '3 patients', '? patients' (unknown)."""
    return f"{n} {one}" if n == 1 else f"{'?' if n is None else n} {many or one + 's'}"


def _run_meta(out_dir: Path, run_info: dict, summary_rows: list[dict]) -> list[tuple[str, str]]:
    """(label, escaped html) pairs describing the model and the run."""
    model = run_info.get("model", {})
    arguments = run_info.get("arguments", {})
    counts = run_info.get("counts", {})
    started = run_info.get("timings", {}).get("started_unix")
    threshold = arguments.get("threshold")
    if threshold is None and summary_rows:
        threshold = summary_rows[0].get("threshold")
    meta = [
        (
            "Model",
            _esc(Path(str(model.get("path", "unknown"))).name)
            + (" <strong>(DEMO)</strong>" if model.get("demo") else ""),
        ),
        ("Model sha256", _esc(model.get("sha256", "unknown"))),
        ("Trained on", _esc(model.get("trained_on", "unknown"))),
        ("Threshold", _esc(f"prob_idc >= {float(threshold):.4f}") if _number(threshold) is not None else "unknown"),
    ]
    if counts:
        meta.append(
            (
                "Counts",
                _esc(
                    f"{_counted(counts.get('patients'), 'patient')}, "
                    f"{_counted(counts.get('patches'), 'patch', 'patches')}, "
                    f"{counts.get('scored', '?')} scored, {counts.get('failed', '?')} failed"
                ),
            )
        )
    if _number(started) is not None:
        meta.append(("Run started", _esc(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(started))))))
    version = run_info.get("versions", {}).get("idc")
    if version:
        meta.append(("idc version", _esc(version)))
    files = " ".join(
        link
        for link in (
            _link_if_exists(out_dir, "summary.csv", "summary.csv"),
            _link_if_exists(out_dir, "run.json", "run.json"),
        )
        if link
    )
    if files:
        meta.append(("Files", files))
    return meta


def _header_cell(text: str, sort_type: str | None, css_class: str) -> str:
    attributes = ' scope="col"'
    if css_class:
        attributes += f' class="{css_class}"'
    if sort_type:
        attributes += f' data-type="{sort_type}"'
    return f"<th{attributes}>{_esc(text)}</th>"


def report_html(out_dir: Path, summary_rows: list[dict], run_info: dict) -> str:
    """The text of report.html for the reports in ``out_dir`` (links only to files that exist there)."""
    from .engine import COHORT_ID  # engine imports heavy-ish modules; only needed here

    out_dir = Path(out_dir)
    patients = [r for r in summary_rows if r.get("patient_id") != COHORT_ID]
    cohort = [r for r in summary_rows if r.get("patient_id") == COHORT_ID]
    labelled = any((_number(r.get("n_labelled")) or 0) > 0 for r in summary_rows)
    demo = bool(run_info.get("model", {}).get("demo"))
    headline = run_info.get("model", {}).get("fraction_headline", "counted")
    headline = headline if headline in ESTIMATOR_COLUMNS else "counted"
    headline_why = (
        run_info.get("model", {}).get("fraction_headline_why") or "the model carries no measurement of the others"
    )
    headers = [
        ("Patient", "str", "id"),
        ("Mosaic", None, ""),
        ("Patches", "num", ""),
        ("Scored", "num", ""),
        ("Failed", "num", ""),
    ]
    headers += [
        (ESTIMATOR_TITLES[name] + " [95% interval]", "num", "headline" if name == headline else "")
        for name in _estimator_order(headline)
    ]
    headers += [("Mean prob_idc", "num", ""), ("Notes", "str", "")]
    if labelled:
        headers += [
            ("True IDC fraction", "num", ""),
            ("Sensitivity", "num", ""),
            ("Specificity", "num", ""),
            ("Balanced accuracy", "num", ""),
        ]
    headers.append(("Files", None, "id"))
    head = "".join(_header_cell(text, kind, cls) for text, kind, cls in headers)
    body = "\n".join(_patient_row(out_dir, r, labelled, False, headline) for r in patients)
    foot = "\n".join(_patient_row(out_dir, r, labelled, True, headline) for r in cohort)
    meta = "\n".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in _run_meta(out_dir, run_info, summary_rows))
    demo_banner = (
        ('<p class="demo">DEMO MODEL: trained on synthetic data. Its outputs say nothing about real tissue.</p>')
        if demo
        else ""
    )
    # no network: the policy allows only this page's own script and style, and images from disk
    csp = (
        f"default-src 'none'; img-src 'self' file: data:; style-src {_csp_hash(_REPORT_CSS)}; "
        f"script-src {_csp_hash(_REPORT_JS)}; base-uri 'none'; form-action 'none'"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>IDC review report ({_esc(RESEARCH_NOTICE)})</title>
<style>{_REPORT_CSS}</style>
</head>
<body>
<h1>IDC review report</h1>
<p class="notice">{_esc(RESEARCH_NOTICE.upper())}. A model&rsquo;s estimate of invasive ductal carcinoma per patch,
for research review beside the slides.</p>
{demo_banner}
<dl class="meta">
{meta}
</dl>
<p class="headline"><strong>{_esc(ESTIMATOR_TITLES[headline])}</strong> (first column; {_esc(headline_why)}):
{_esc(ESTIMATOR_TEXT[headline])}</p>
<p>{
        "".join(
            f"<strong>{_esc(ESTIMATOR_TITLES[name])}</strong>: {_esc(ESTIMATOR_TEXT[name])} "
            for name in _estimator_order(headline)[1:]
        )
    }Notes say when a patient was in the model's training data,
when its colours lie outside the training patients' and when too few patches were scored.
Mosaics: tissue rebuilt from the patches at their slide x/y, prob_idc as a heatmap (blue 0, red 1) with
predicted IDC outlined; beside it the ground-truth labels where the file names carry them. Click a header to sort.</p>
<table id="cohort">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
<tfoot>
{foot}
</tfoot>
</table>
<script>{_REPORT_JS}</script>
</body>
</html>
"""


def write_report_html(out_dir: Path, summary_rows: list[dict], run_info: dict) -> Path:
    """Write ``report.html`` into ``out_dir`` atomically; returns its path."""
    target = Path(out_dir) / REPORT_NAME
    with atomic_path(target) as handle:
        handle.write(report_html(out_dir, summary_rows, run_info))
    return target
