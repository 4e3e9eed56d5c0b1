"""QuPath GeoJSON of a patient's scored patches: one tile Feature per patch, in the frame the file states."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .files import RESEARCH_NOTICE, atomic_path
from .mosaic import NOMINAL_PATCH_PX
from .schema import PatchRow

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

IDC_RGB = (200, 0, 0)  # QuPath's own "Tumor" class colour
NON_IDC_RGB = (40, 120, 220)
GEOJSON_SUFFIX = ".geojson"
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
_NAMESPACE_BYTES = FEATURE_NAMESPACE.bytes


def feature_id(name: str) -> str:
    """str(uuid.uuid5(FEATURE_NAMESPACE, name)), character for character (a test holds the two equal), without
    building a UUID object: a third of the time, for every feature of every patient. A name holding bytes that
    are not UTF-8 (a Linux file or folder name, surrogate-escaped by Python) is hashed as those bytes, where
    uuid5 raises."""
    data = _NAMESPACE_BYTES + name.encode("utf-8", "surrogateescape")
    digest = bytearray(hashlib.sha1(data, usedforsecurity=False).digest()[:16])  # an id, not a secret: FIPS builds
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _scaled(value: float, scale: float) -> int | float:
    scaled = value * scale
    return int(scaled) if float(scaled).is_integer() else round(scaled, 3)


def _geometry(row: PatchRow, scale: float) -> tuple:
    assert row.x is not None and row.y is not None and row.prob_idc is not None and row.pred is not None, row
    x, y = _scaled(int(row.x), scale), _scaled(int(row.y), scale)
    width = _scaled(int(row.width_px or NOMINAL_PATCH_PX), scale)
    height = _scaled(int(row.height_px or NOMINAL_PATCH_PX), scale)
    return x, y, width, height, int(row.pred), round(float(row.prob_idc), 6)


def patch_feature(row: PatchRow, patient_id: str, scale: float = 1.0) -> dict:
    """One scored, placed patch as a QuPath tile Feature: a closed square ring at its slide x/y (times ``scale``)."""
    x, y, width, height, pred, prob = _geometry(row, scale)
    measurements: dict[str, float | int] = {"prob_idc": prob, "pred": pred}
    if row.label is not None:
        measurements["label"] = int(row.label)
    return {
        "type": "Feature",
        "id": feature_id(f"{patient_id}/{row.path}"),
        "geometry": {
            "type": "Polygon",
            # counter-clockwise with y up, as RFC 7946 asks; QuPath (y down) accepts either way
            "coordinates": [[[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]]],
        },
        "properties": {
            "objectType": "tile",
            "name": str(row.path),
            "classification": {"name": "IDC", "color": list(IDC_RGB)}
            if pred
            else {"name": "non-IDC", "color": list(NON_IDC_RGB)},
            "isLocked": True,
            "measurements": measurements,
        },
    }


_IDC_CLASS = json.dumps({"name": "IDC", "color": list(IDC_RGB)}, separators=(",", ":"))
_NON_IDC_CLASS = json.dumps({"name": "non-IDC", "color": list(NON_IDC_RGB)}, separators=(",", ":"))


def patch_feature_json(row: PatchRow, patient_id: str, scale: float = 1.0) -> str:
    """json.dumps(patch_feature(...), separators=(",", ":")), byte for byte, from a string template: a third
    of the time per feature (a test holds the two equal)."""
    x, y, width, height, pred, prob = _geometry(row, scale)
    x1, y1 = x + width, y + height
    if not math.isfinite(prob):
        raise ValueError(f"prob_idc {prob} is not a number")
    label = "" if row.label is None else f',"label":{int(row.label)}'
    patch_id = feature_id(f"{patient_id}/{row.path}")
    return (
        f'{{"type":"Feature","id":"{patch_id}","geometry":{{"type":"Polygon","coordinates":[[[{x!r},{y!r}],'
        f'[{x1!r},{y!r}],[{x1!r},{y1!r}],[{x!r},{y1!r}],[{x!r},{y!r}]]]}},"properties":{{"objectType":"tile",'
        f'"name":{json.dumps(str(row.path))},"classification":{_IDC_CLASS if pred else _NON_IDC_CLASS},'
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

    def add(self, row: PatchRow, rgb: np.ndarray | None) -> None:
        if not (row.placed and row.scored):
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
