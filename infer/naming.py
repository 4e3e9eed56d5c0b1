"""Patch file names: patient id, slide coordinates and label from the Kaggle naming scheme."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# <pid>_idx5_x<X>_y<Y>_class<C>.png, as in the public "Breast Histopathology Images" set
KAGGLE_NAME = re.compile(
    r"^(?P<pid>[A-Za-z0-9-]+)_idx\d+_x(?P<x>\d+)_y(?P<y>\d+)(?:_class(?P<label>[01]))?\.[A-Za-z0-9]+$"
)
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


def parse_patch_name(name: str) -> PatchName:
    """Parse a Kaggle patch file name; fields that the name does not carry are None."""
    match = KAGGLE_NAME.match(name)
    if not match:
        return PatchName(None, None, None, None)
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
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
