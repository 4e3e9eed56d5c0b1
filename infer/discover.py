"""Find patients and their patch files: patient dirs, cohort roots and path lists, lazily."""
from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .naming import LABEL_DIRS, is_candidate_image, parse_patch_name, patient_dir_of


@dataclass
class SkipCounter:
    """Files seen but not scored (hidden files, non-image suffixes), by reason."""

    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Patient:
    """One patient's patches: either a directory walked lazily or an explicit list of paths."""

    patient_id: str
    root: Path | None = None
    paths: list[Path] | None = None
    exclude: frozenset[Path] = frozenset()  # resolved dirs never walked (the report dir, for one)

    def iter_paths(self, skipped: SkipCounter | None = None) -> Iterator[Path]:
        if self.paths is not None:
            yield from self.paths
        else:
            yield from _walk_patches(self.root, skipped or SkipCounter(), self.exclude)


def _sorted_entries(directory: Path, skipped: SkipCounter | None = None) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError:  # permission denied, vanished: counted, the run goes on
        if skipped is not None:
            skipped.skip("unreadable directory")
        return []


def _is_hidden(entry: os.DirEntry) -> bool:
    if entry.name.startswith("."):
        return True
    if os.name == "nt":  # $RECYCLE.BIN, System Volume Information, Thumbs.db marked hidden
        attributes = getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0)
        return bool(attributes & (stat.FILE_ATTRIBUTE_HIDDEN | stat.FILE_ATTRIBUTE_SYSTEM))
    return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _is_walkable_dir(entry: os.DirEntry, exclude: frozenset[Path]) -> bool:
    return _is_dir(entry) and not _is_hidden(entry) and Path(entry.path).resolve() not in exclude


def _walk_patches(directory: Path, skipped: SkipCounter, exclude: frozenset[Path] = frozenset()) -> Iterator[Path]:
    """Image files under a patient dir, depth first in name order, so runs are reproducible."""
    for entry in _sorted_entries(directory, skipped):
        if _is_dir(entry):
            if _is_walkable_dir(entry, exclude):
                yield from _walk_patches(Path(entry.path), skipped, exclude)
            else:
                skipped.skip("hidden or excluded directory")
        elif is_candidate_image(entry.name) and not _is_hidden(entry):
            yield Path(entry.path)
        else:
            skipped.skip("hidden file" if _is_hidden(entry) else "not an image file name")


def _looks_like_patient_dir(directory: Path, exclude: frozenset[Path]) -> bool:
    """A patient dir holds images directly or ``0/``/``1/`` folders; a cohort root holds dirs."""
    subdirs = []
    for entry in _sorted_entries(directory):
        if _is_walkable_dir(entry, exclude):
            subdirs.append(entry.name)
        elif is_candidate_image(entry.name):
            return True
    return not subdirs or all(name in LABEL_DIRS for name in subdirs)


def patients_from_dirs(directories: Iterable[Path], exclude: Iterable[Path] = ()) -> list[Patient]:
    """Each argument is a patient directory or a cohort root of patient directories.

    ``exclude``: directories never taken for patients or walked, e.g. the report directory
    when it sits inside the input (``idc-infer .`` twice).
    """
    excluded = frozenset(Path(p).resolve() for p in exclude)
    patients: list[Patient] = []
    for directory in directories:
        directory = Path(directory)
        if _looks_like_patient_dir(directory, excluded):
            patients.append(Patient(directory.resolve().name, root=directory, exclude=excluded))
            continue
        for entry in _sorted_entries(directory):
            if _is_walkable_dir(entry, excluded):
                patients.append(Patient(entry.name, root=Path(entry.path), exclude=excluded))
    return patients


def patient_id_of(path: Path) -> str:
    """Patient id from the Kaggle file name, else the patient directory's name."""
    parsed = parse_patch_name(path.name).patient_id
    return parsed if parsed is not None else patient_dir_of(path).resolve().name


def patients_from_list(lines: Iterable[str], base: Path, skipped: SkipCounter) -> list[Patient]:
    """Group the paths of a list file by patient, keeping the order of first appearance."""
    groups: dict[str, list[Path]] = {}
    for raw in lines:
        line = raw.strip().lstrip("\ufeff")  # a list saved by Notepad or Excel starts with a BOM
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        if not path.is_absolute():
            path = base / path
        if not is_candidate_image(path.name):
            skipped.skip("hidden file" if path.name.startswith(".") else "not an image file name")
            continue
        groups.setdefault(patient_id_of(path), []).append(path)
    return [Patient(pid, paths=paths) for pid, paths in groups.items()]


def duplicate_ids(patients: list[Patient]) -> list[str]:
    """Patient ids whose report files would collide (same id, or same file stem on a
    case-insensitive file system)."""
    from .files import safe_file_stem

    by_stem: dict[str, set[str]] = {}
    for patient in patients:
        by_stem.setdefault(safe_file_stem(patient.patient_id).casefold(), set()).add(patient.patient_id)
    counts = Counter(safe_file_stem(p.patient_id).casefold() for p in patients)
    return sorted(", ".join(sorted(by_stem[stem])) for stem, n in counts.items() if n > 1)

