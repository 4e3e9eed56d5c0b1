"""Patch file names: patient id, slide coordinates and label from the Kaggle naming scheme."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

# <pid>_idx5_x<X>_y<Y>_class<C>.png, as in the public "Breast Histopathology Images" set
# (idc-tile writes the same pattern for a slide whose id may hold '_' or '.': the id ends at the last _idx)
KAGGLE_NAME = re.compile(
    r"^(?P<pid>[A-Za-z0-9][A-Za-z0-9._-]*?)_idx\d+_x(?P<x>\d+)_y(?P<y>\d+)(?:_class(?P<label>[01]))?\.[A-Za-z0-9]+$"
)
# QuPath's TileExporter: "<image> [d=D,x=X,y=Y,w=W,h=H].png" (d= only when downsampled; z=, t= on stacks), the
# region in the full-resolution image's pixels
QUPATH_NAME = re.compile(r"^(?P<image>.+?) \[(?P<fields>(?:[a-z]=[0-9.]+,)*[a-z]=[0-9.]+)\]\.[A-Za-z0-9]+$")
# class folders, lower case: the public set's 0/ 1/, and benign/ malignant/ (BreakHis-style) which
# idc-train accepts too, so idc-infer reads their labels instead of taking them for patients
LABEL_DIRS = {"0": 0, "1": 1, "benign": 0, "malignant": 1, "non-idc": 0, "idc": 1}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class PatchName:
    patient_id: str | None
    x: int | None
    y: int | None
    label: int | None
    # a QuPath tile: the region's size in full-resolution pixels (the frame of x, y) and its downsample
    width: int | None = None
    height: int | None = None
    downsample: float | None = None

    @property
    def is_region_export(self) -> bool:
        return self.width is not None


def parse_qupath_name(name: str) -> PatchName | None:
    match = QUPATH_NAME.match(name)
    if not match:
        return None
    fields: dict[str, float] = {}
    for pair in match.group("fields").split(","):
        key, _, value = pair.partition("=")
        try:
            fields[key] = float(value)
        except ValueError:
            return None
    if not {"x", "y", "w", "h"} <= set(fields) or min(fields["w"], fields["h"]) <= 0:
        return None
    return PatchName(
        match.group("image"),
        int(fields["x"]),
        int(fields["y"]),
        None,
        int(fields["w"]),
        int(fields["h"]),
        fields.get("d", 1.0),
    )


# a worker parses a patch's name when it decodes it and again when it writes its row: the second is a lookup
@functools.lru_cache(maxsize=4096)
def parse_patch_name(name: str) -> PatchName:
    """Parse a Kaggle patch file name (or a QuPath tile export's); fields the name does not carry are None."""
    match = KAGGLE_NAME.match(name)
    if not match:
        return parse_qupath_name(name) or PatchName(None, None, None, None)
    label = match.group("label")
    return PatchName(
        patient_id=match.group("pid"),
        x=int(match.group("x")),
        y=int(match.group("y")),
        label=None if label is None else int(label),
    )


def is_label_dir(name: str) -> bool:
    return name.lower() in LABEL_DIRS


def label_from_parent(path: Path) -> int | None:
    """The label of a patch stored under a class folder (``0/``, ``1/``, ``benign/``...), else None."""
    return LABEL_DIRS.get(path.parent.name.lower())


def patient_dir_of(path: Path) -> Path:
    """The patient directory of a patch: its folder, or the one above a ``0/``/``1/`` folder."""
    parent = path.parent
    return parent.parent if is_label_dir(parent.name) else parent


def is_candidate_image(name: str) -> bool:
    """True for files idc tries to score; hidden files and non-image suffixes are skipped."""
    # os.path.splitext, not Path(name).suffix: the same suffix for a name that is not hidden, at a third the cost
    # (it runs for every file of every walk)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
