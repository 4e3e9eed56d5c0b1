"""Find patients and their patch files: patient dirs, cohort roots and path lists, lazily."""
from __future__ import annotations

import os
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

    def iter_paths(self, skipped: SkipCounter | None = None) -> Iterator[Path]:
        if self.paths is not None:
            yield from self.paths
        else:
            yield from _walk_patches(self.root, skipped or SkipCounter())


def _sorted_entries(directory: Path) -> list[os.DirEntry]:
    with os.scandir(directory) as entries:
        return sorted(entries, key=lambda e: e.name)


def _walk_patches(directory: Path, skipped: SkipCounter) -> Iterator[Path]:
    """Image files under a patient dir, depth first in name order, so runs are reproducible."""
    for entry in _sorted_entries(directory):
        if entry.is_dir(follow_symlinks=True):
            if entry.name.startswith("."):
                skipped.skip("hidden directory")
                continue
            yield from _walk_patches(Path(entry.path), skipped)
        elif is_candidate_image(entry.name):
            yield Path(entry.path)
        else:
            skipped.skip("hidden file" if entry.name.startswith(".") else "not an image file name")


def _looks_like_patient_dir(directory: Path) -> bool:
    """A patient dir holds images directly or ``0/``/``1/`` folders; a cohort root holds dirs."""
    subdirs = []
    for entry in _sorted_entries(directory):
        if entry.is_dir() and not entry.name.startswith("."):
            subdirs.append(entry.name)
        elif is_candidate_image(entry.name):
            return True
    return not subdirs or all(name in LABEL_DIRS for name in subdirs)


def patients_from_dirs(directories: Iterable[Path]) -> list[Patient]:
    """Each argument is a patient directory or a cohort root of patient directories."""
    patients: list[Patient] = []
    for directory in directories:
        directory = Path(directory)
        if _looks_like_patient_dir(directory):
            patients.append(Patient(directory.resolve().name, root=directory))
            continue
        for entry in _sorted_entries(directory):
            if entry.is_dir() and not entry.name.startswith("."):
                patients.append(Patient(entry.name, root=Path(entry.path)))
    return patients


def patient_id_of(path: Path) -> str:
    """Patient id from the Kaggle file name, else the patient directory's name."""
    parsed = parse_patch_name(path.name).patient_id
    return parsed if parsed is not None else patient_dir_of(path).resolve().name


def patients_from_list(lines: Iterable[str], base: Path, skipped: SkipCounter) -> list[Patient]:
    """Group the paths of a list file by patient, keeping the order of first appearance."""
    groups: dict[str, list[Path]] = {}
    for raw in lines:
        line = raw.strip()
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
    counts = Counter(p.patient_id for p in patients)
    return sorted(pid for pid, n in counts.items() if n > 1)

