"""Find patients and their patch files: patient dirs, cohort roots and path lists, lazily."""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .naming import is_candidate_image, is_label_dir, label_from_parent, parse_patch_name, patient_dir_of

if TYPE_CHECKING:
    from .contract import Contract
    from .preprocess import Decoded
    from .quality import QualityControl

log = logging.getLogger(__name__)

LOOSE_IMAGE_IN_COHORT_ROOT = "image beside patient folders in a cohort root"
DIRECTORY_ALREADY_WALKED = "link to a directory already walked"
REPORT_DIRECTORY = "folder of idc reports"
UNREADABLE_DIRECTORY = "unreadable directory"
LINK_OUTSIDE_PATIENT = "link to a folder outside the patient"
STATE_DIR = ".idc-state"  # what marks a folder of idc's own reports (engine writes it)


def is_report_dir(path: str | Path) -> bool:
    """A folder idc-infer wrote its reports into: its mosaics are not patches of a patient."""
    return os.path.isdir(os.path.join(path, STATE_DIR))


DUPLICATE_LIST_PATH = "path listed more than once"


@dataclass
class SkipCounter:
    """Files and folders seen but not scored (hidden files, non-image suffixes, repeats), by reason."""

    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

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
            assert self.root is not None, "a Patient has a root folder or a list of paths"
            yield from _walk_patches(self.root, skipped or SkipCounter(), self.exclude)

    @property
    def frame_scale(self) -> float:
        """Level-0 pixels per patch pixel of the rows' x, y (a slide's tiles are drawn at the patch scale)."""
        return 1.0

    def decoder(self, contract: Contract, qc: QualityControl | None = None) -> Callable[[Any], Decoded]:
        """item -> Decoded for this patient's items (here: patch files; a QuPath tile export is brought to the
        native patch size first, as its region may be of any size)."""
        from .preprocess import decode_file

        def decode(path: Path) -> Decoded:
            region = parse_patch_name(path.name).is_region_export
            return decode_file(path, contract, qc, "QuPath tile" if region else None, defer=True)

        return decode

    def describe(self, path: Path) -> tuple[str, int | None, int | None, int | None, tuple[int, int] | None]:
        """(path column, x, y, label, size of the patch in the frame of x, y when the name says it) of a row."""
        name = parse_patch_name(path.name)
        label = name.label if name.label is not None else label_from_parent(path)
        display = str(path)
        if self.root is not None:
            prefix = str(self.root) + os.sep
            if display.startswith(prefix):  # a walked file: what relative_to gives, at a tenth of the cost
                display = display[len(prefix) :].replace(os.sep, "/")
            else:
                try:
                    display = path.relative_to(self.root).as_posix()
                except ValueError:
                    pass
        # a QuPath region's size (is_region_export: both are set)
        extent = (name.width, name.height) if name.width is not None and name.height is not None else None
        return display, name.x, name.y, label, extent

    def input_key(self) -> str:
        """What --resume compares besides the items' own stats (a slide's file and tiling settings)."""
        return ""

    def finish(self) -> None:
        """Release what scoring held open (a slide's file handle)."""


def _sorted_entries(directory: Path, skipped: SkipCounter | None = None) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as exc:  # permission denied, vanished: said, counted, the run goes on
        if skipped is not None:
            log.warning("%s cannot be read (%s): patches in it are not scored", directory, exc.strerror or exc)
            skipped.skip(UNREADABLE_DIRECTORY)
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
    return (
        _is_dir(entry)
        and not _is_hidden(entry)
        and Path(entry.path).resolve() not in exclude
        and not is_report_dir(entry.path)
    )


def _directory_key(path: str | Path) -> tuple | None:
    """What makes a directory the same one however it is reached (through links, junctions,
    bind mounts): its device and inode; the real path where the file system has no inodes."""
    try:
        # os.stat, not DirEntry.stat: on Windows the latter leaves st_ino at 0
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    if info.st_ino:
        return info.st_dev, info.st_ino
    return "path", os.path.normcase(os.path.realpath(path))


def _real(path: str | Path) -> str:
    try:
        return os.path.normcase(os.path.realpath(path))
    except (OSError, ValueError):
        return os.path.normcase(os.path.abspath(path))


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip(os.sep) + os.sep)


def _walk_patches(
    directory: Path,
    skipped: SkipCounter,
    exclude: frozenset[Path] = frozenset(),
    visited: set | None = None,
    tree: str | None = None,
) -> Iterator[Path]:
    """Image files under a patient dir, depth first in name order, so runs are reproducible.

    Each real directory is walked once: a link back up the tree (``ln -s .. back``) or a
    second link to a folder already walked would otherwise score the same patches again,
    or forever. ``visited`` holds one key per directory, so memory follows the number of
    folders, never the number of files.
    """
    if visited is None:
        visited = set()
        root_key = _directory_key(directory)
        if root_key is not None:
            visited.add(root_key)
    if tree is None:
        tree = _real(directory)
    for entry in _sorted_entries(directory, skipped):
        if _is_dir(entry):
            if not _is_walkable_dir(entry, exclude):
                skipped.skip("hidden or excluded directory")
                continue
            if entry.is_symlink() and not _inside(_real(entry.path), tree):
                # a link out of the patient's folder (ln -s .. back) would pull other patients' patches in
                log.warning("%s links outside the patient folder %s: not followed", entry.path, directory)
                skipped.skip(LINK_OUTSIDE_PATIENT)
                continue
            key = _directory_key(entry.path)
            if key is not None and key in visited:
                log.debug("%s leads to a directory already walked; not walked again", entry.path)
                skipped.skip(DIRECTORY_ALREADY_WALKED)
                continue
            if key is not None:
                visited.add(key)
            yield from _walk_patches(Path(entry.path), skipped, exclude, visited, tree)
        elif is_candidate_image(entry.name) and not _is_hidden(entry):
            yield Path(entry.path)
        else:
            skipped.skip("hidden file" if _is_hidden(entry) else "not an image file name")


def _holds_patches(directory: str, exclude: frozenset[Path]) -> bool:
    """A shallow look: images directly, or ``0/``/``1/`` label folders. Stops at the first
    hit, so a patient folder of 100,000 flat patches costs one directory read, not a sort."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if _is_hidden(entry):
                    continue
                if _is_dir(entry):
                    if is_label_dir(entry.name) and _is_walkable_dir(entry, exclude):
                        return True
                elif is_candidate_image(entry.name):
                    return True
    except OSError:
        pass
    return False


def _is_class_folder(entry: os.DirEntry, exclude: frozenset[Path]) -> bool:
    """0/ and 1/ always; a worded class folder (benign/, malignant/, idc/...) only when it holds patches
    itself: datasets/idc/8863/... is a cohort folder named idc, not IDC patches of one patient."""
    if not is_label_dir(entry.name):
        return False
    return entry.name in ("0", "1") or _holds_patches(entry.path, exclude)


def _first_image_patient(directory: str, depth: int = 2) -> str | None:
    """The Kaggle patient id of the first image in ``directory``, or else in its class folders (0/, 1/,
    benign/...: 8863/tiles/1/8863_idx5_...), ``depth`` levels down at most; a few directory reads."""
    try:
        with os.scandir(directory) as scanned:
            entries = sorted(scanned, key=lambda e: e.name)[:64]  # sorted: the same answer on every file system
    except OSError:
        return None
    for entry in entries:
        if not _is_hidden(entry) and is_candidate_image(entry.name):
            return parse_patch_name(entry.name).patient_id
    if depth > 1:
        for entry in entries:
            if _is_dir(entry) and not _is_hidden(entry) and is_label_dir(entry.name):
                found = _first_image_patient(entry.path, depth - 1)
                if found is not None:
                    return found
    return None


def _classify(directory: Path, exclude: frozenset[Path]) -> tuple[bool, list[os.DirEntry], list[os.DirEntry]]:
    """(is a patient dir, walkable subdirectories, loose image files) of one input directory.

    A patient dir holds images directly and/or ``0/``/``1/`` folders; a cohort root holds
    patient dirs. Loose images beside patient dirs (a slide overview, a stray export) do not
    turn a cohort root into one patient: that would merge every patient of the cohort into
    a single row. Images whose Kaggle names carry this directory's name are the exception:
    they say this is the patient's own folder, whatever subfolders sit beside them.
    """
    subdirs, loose = [], []
    for entry in _sorted_entries(directory):
        if _is_dir(entry) and not _is_hidden(entry) and is_report_dir(entry.path):
            log.warning("%s holds idc reports (it has %s): not scored as a patient", entry.path, STATE_DIR)
            continue
        if _is_walkable_dir(entry, exclude):
            subdirs.append(entry)
        elif not _is_dir(entry) and not _is_hidden(entry) and is_candidate_image(entry.name):
            loose.append(entry)
    if not subdirs or any(_is_class_folder(entry, exclude) for entry in subdirs):
        return True, subdirs, loose
    own_name = directory.resolve().name
    if not loose:
        # 8863/tiles/8863_idx5_...: the images below carry this folder's name, so it is the patient
        # (not a cohort with a patient "tiles")
        return any(_first_image_patient(entry.path) == own_name for entry in subdirs), subdirs, loose
    if any(parse_patch_name(entry.name).patient_id == own_name for entry in loose):
        return True, subdirs, loose
    if any(_holds_patches(entry.path, exclude) for entry in subdirs):
        return False, subdirs, loose
    return True, subdirs, loose  # images plus folders that hold none: a patient with extras


def patients_from_dirs(
    directories: Iterable[Path], exclude: Iterable[Path] = (), skipped: SkipCounter | None = None
) -> list[Patient]:
    """Each argument is a patient directory or a cohort root of patient directories.

    ``exclude``: directories never taken for patients or walked, e.g. the report directory
    when it sits inside the input (``idc-infer .`` twice). ``skipped`` counts the loose
    images of cohort roots, which are not scored.
    """
    excluded = frozenset(Path(p).resolve() for p in exclude)
    patients: list[Patient] = []
    for directory in directories:
        directory = Path(directory)
        if is_report_dir(directory):
            log.warning("%s holds idc reports (it has %s): not scored as a patient", directory, STATE_DIR)
            if skipped is not None:
                skipped.skip(REPORT_DIRECTORY)
            continue
        is_patient, subdirs, loose = _classify(directory, excluded)
        if is_patient:
            patients.append(Patient(directory.resolve().name, root=directory, exclude=excluded))
            continue
        if loose:
            # Skipped, not reported as a patient named after the cohort folder: a pathologist
            # reading summary.csv would take that row for a patient, and its patches would
            # shift the cohort totals. They are named and counted, so nothing vanishes silently.
            names = ", ".join(entry.name for entry in loose[:5]) + (", ..." if len(loose) > 5 else "")
            log.warning(
                "%s: %d image file(s) beside the patient folders are not in any patient folder "
                "and are not scored (%s); move them into a patient folder or list them with "
                "--from-list",
                directory,
                len(loose),
                names,
            )
            if skipped is not None:
                skipped.skip(LOOSE_IMAGE_IN_COHORT_ROOT, len(loose))
        for entry in subdirs:
            patients.append(Patient(entry.name, root=Path(entry.path), exclude=excluded))
    return patients


def _resolved_dir(directory: str, cache: dict[str, str]) -> str:
    """A directory resolved once per list; a path no file system accepts (a NUL byte) stays
    as written, absolute, so discovery goes on and the decoder reports that row."""
    resolved = cache.get(directory)
    if resolved is None:
        try:
            resolved = os.path.realpath(directory)
        except (OSError, ValueError):
            resolved = os.path.abspath(directory)
        cache[directory] = resolved
    return resolved


def patient_id_of(path: Path, resolved_dirs: dict[str, str] | None = None) -> str:
    """Patient id from the Kaggle file name, else the patient directory's name."""
    parsed = parse_patch_name(path.name).patient_id
    if parsed is not None:
        return parsed
    return Path(_resolved_dir(str(patient_dir_of(path)), {} if resolved_dirs is None else resolved_dirs)).name


def _decoded_lines(lines: Iterable[str]) -> Iterator[str]:
    """The lines of a list file; a file that is not UTF-8 is a ValueError naming the file,
    not a traceback. UTF-16 with a byte-order mark (Notepad's and Excel's "Unicode" text)
    is read as such where the file can be read again from its start."""
    name = getattr(lines, "name", "the list")
    iterator = iter(lines)
    read_any = False
    while True:
        try:
            line = next(iterator)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raw = _raw_bytes(lines)
            if raw is not None and not read_any and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                try:
                    yield from raw.decode("utf-16").splitlines()
                    return
                except UnicodeDecodeError:
                    pass
            where = ""
            if raw is not None:
                try:
                    raw.decode("utf-8-sig")
                except UnicodeDecodeError as exc:
                    line_number = raw.count(b"\n", 0, exc.start) + 1
                    where = f" (line {line_number})"
            raise ValueError(
                f"{name} is not UTF-8 text{where}; the list must be UTF-8 text with one patch path per line"
            ) from None
        read_any = True
        yield line


def _raw_bytes(lines) -> bytes | None:
    """The whole file behind a text stream, when it can be read again from the start."""
    buffer = getattr(lines, "buffer", None)
    try:
        if buffer is None or not buffer.seekable():
            return None
        buffer.seek(0)
        return buffer.read()
    except (OSError, ValueError):
        return None


def patients_from_list(lines: Iterable[str], base: Path, skipped: SkipCounter) -> list[Patient]:
    """Group the paths of a list file by patient, keeping the order of first appearance.

    A path listed twice (as written, or through another relative or linked route to the
    same folder) is scored once: counted twice it would inflate the patient's IDC fraction.
    Raises ValueError when the list is not UTF-8 text.
    """
    groups: dict[str, list[Path]] = {}
    seen: set[tuple[str, str]] = set()
    # folders resolved once, not each line's path: resolving 277k paths takes seconds
    resolved_dirs: dict[str, str] = {}
    for raw in _decoded_lines(lines):
        line = raw.strip().lstrip("\ufeff")  # a list saved by Notepad or Excel starts with a BOM
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        if not path.is_absolute():
            path = base / path
        if not is_candidate_image(path.name):
            skipped.skip("hidden file" if path.name.startswith(".") else "not an image file name")
            continue
        folder, name = os.path.split(path)
        key = (_resolved_dir(folder, resolved_dirs), os.path.normcase(name))
        if key in seen:
            skipped.skip(DUPLICATE_LIST_PATH)
            continue
        seen.add(key)
        groups.setdefault(patient_id_of(path, resolved_dirs), []).append(path)
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
