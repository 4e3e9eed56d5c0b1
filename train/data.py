"""Labelled patch discovery and patient-level splits, as manifests (never copies of the data)."""
from __future__ import annotations

import csv
import importlib.resources
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from idc_infer.naming import is_candidate_image, parse_patch_name

log = logging.getLogger(__name__)

CLASS_DIRS = {"0": 0, "1": 1, "benign": 0, "malignant": 1, "non-idc": 0, "idc": 1}
# BreakHis: SOB_<B|M>_<tumour type>-<year>-<slide id>-<magnification>-<seq>.png
BREAKHIS_NAME = re.compile(r"^SOB_(?P<cls>[BM])_[A-Z]+-(?P<patient>\d+-[A-Za-z0-9]+)-\d+-\d+\.\w+$")
SET_NAMES = ("train", "val", "test")
PUBLISHED_SPLITS = ("janowczyk2016",)
LEAKY_WARNING = (
    "--split random-patch puts patches of the same patient on both sides: metrics are inflated and do not "
    "say how the model does on a new patient (reproduces the seed tutorial only)"
)


@dataclass(frozen=True)
class LabelledPatch:
    path: Path
    patient_id: str
    label: int


def _patient_of(path: Path, data_dir: Path) -> str:
    """From the file name (Kaggle, BreakHis), else the folder above a class folder
    (``<pid>/benign/x.png``), else the folder holding the file."""
    parsed = parse_patch_name(path.name).patient_id
    if parsed is not None:
        return parsed
    breakhis = BREAKHIS_NAME.match(path.name)
    if breakhis:
        return breakhis.group("patient")
    folder = path.parent
    if folder.name.lower() in CLASS_DIRS and folder.parent != data_dir and folder.parent.name not in SET_NAMES:
        return folder.parent.name
    return folder.name


def _label_of(path: Path) -> int | None:
    parsed = parse_patch_name(path.name).label
    if parsed is not None:
        return parsed
    breakhis = BREAKHIS_NAME.match(path.name)
    if breakhis:
        return int(breakhis.group("cls") == "M")
    return CLASS_DIRS.get(path.parent.name.lower())


def discover_labelled(data_dir: Path) -> list[LabelledPatch]:
    """Every labelled image under ``data_dir`` (Kaggle or class-folder layout), sorted by path."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    patches = []
    unlabelled = 0
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file() or not is_candidate_image(path.name):
            continue
        if any(part.startswith(".") for part in path.relative_to(data_dir).parts):
            continue
        label = _label_of(path)
        if label is None:
            unlabelled += 1
            continue
        patches.append(LabelledPatch(path, _patient_of(path, data_dir), label))
    if unlabelled:
        log.warning("%d image(s) under %s carry no label and were left out", unlabelled, data_dir)
    folder_ids = sorted({p.patient_id for p in patches if p.patient_id.lower() in CLASS_DIRS})
    if folder_ids:
        log.warning("patient ids of some patches could not be read from their file names (they got the class "
                    "folder names %s): a patient-level split cannot keep those patients apart", ", ".join(folder_ids))
    return patches


def counts_by_patient(patches: list[LabelledPatch]) -> dict[str, tuple[int, int]]:
    """patient_id -> (non-IDC count, IDC count)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for patch in patches:
        counts[patch.patient_id][patch.label] += 1
    return {pid: (c[0], c[1]) for pid, c in sorted(counts.items())}


def patient_split(
    patient_counts: dict[str, tuple[int, int]], fractions=(0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, str]:
    """Assign whole patients to train/val/test, seeded and stratified by IDC ratio.

    Patients are sorted by their IDC ratio and dealt out in blocks, each block shuffled by the
    seed, so every set spans the range of ratios. Val and test get at least one patient each
    when there are three or more patients.
    """
    rng = random.Random(seed)
    pids = sorted(patient_counts, key=lambda p: (patient_counts[p][1] / max(1, sum(patient_counts[p])), p))
    n = len(pids)
    n_val = max(1 if n >= 3 else 0, round(n * fractions[1]))
    n_test = max(1 if n >= 3 else 0, round(n * fractions[2]))
    n_eval = n_val + n_test
    assignment = {}
    if n_eval:
        block = max(1, n // n_eval)
        eval_pids = []
        for start in range(0, n, block):
            group = pids[start : start + block]
            eval_pids.append(rng.choice(group))
            if len(eval_pids) == n_eval:
                break
        rng.shuffle(eval_pids)
        for pid in eval_pids[:n_val]:
            assignment[pid] = "val"
        for pid in eval_pids[n_val:]:
            assignment[pid] = "test"
    for pid in pids:
        assignment.setdefault(pid, "train")
    return dict(sorted(assignment.items()))


def read_split_manifest(path: Path) -> dict[str, str]:
    """A split manifest: CSV with columns patient_id,set (set in train/val/test)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: manifests saved by Excel
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"patient_id", "set"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a split manifest needs the columns patient_id,set")
        assignment = {}
        for row in reader:
            if row["set"] not in SET_NAMES:
                raise ValueError(f"{path}: unknown set {row['set']!r} for patient {row['patient_id']}")
            assignment[row["patient_id"].strip()] = row["set"]
    return assignment


def write_split_manifest(path: Path, assignment: dict[str, str], counts: dict[str, tuple[int, int]]) -> None:
    from idc_infer.files import write_csv

    rows = [
        {"patient_id": pid, "set": name, "n_non_idc": counts.get(pid, (0, 0))[0], "n_idc": counts.get(pid, (0, 0))[1]}
        for pid, name in sorted(assignment.items())
    ]
    write_csv(Path(path), ("patient_id", "set", "n_non_idc", "n_idc"), rows)


def apply_split(patches: list[LabelledPatch], assignment: dict[str, str]) -> dict[str, list[LabelledPatch]]:
    sets: dict[str, list[LabelledPatch]] = {name: [] for name in SET_NAMES}
    missing = Counter()
    for patch in patches:
        name = assignment.get(patch.patient_id)
        if name is None:
            missing[patch.patient_id] += 1
            continue
        sets[name].append(patch)
    if missing:
        log.warning("%d patient(s) not in the split were left out: %s", len(missing), ", ".join(sorted(missing)[:10]))
    return sets


def published_split(name: str) -> dict[str, str]:
    """A published patient split shipped with idc (train.txt/val.txt/test.txt of patient ids)."""
    if name not in PUBLISHED_SPLITS:
        raise ValueError(f"unknown published split {name!r}; known: {', '.join(PUBLISHED_SPLITS)}")
    folder = importlib.resources.files("idc_train") / "splits" / name
    assignment = {}
    for set_name in SET_NAMES:
        for line in (folder / f"{set_name}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                assignment[line.strip()] = set_name
    return assignment


def random_patch_split(patches: list[LabelledPatch], seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[LabelledPatch]]:
    """The seed tutorial's per-patch split: leaks patients across sets (kept only to reproduce it)."""
    log.warning(LEAKY_WARNING)
    shuffled = list(patches)
    random.Random(seed).shuffle(shuffled)
    n_train = round(len(shuffled) * fractions[0])
    n_val = round(len(shuffled) * fractions[1])
    return {"train": shuffled[:n_train], "val": shuffled[n_train : n_train + n_val], "test": shuffled[n_train + n_val :]}


def resolve_split(split: str, patches: list[LabelledPatch], seed: int = 0) -> tuple[dict[str, list[LabelledPatch]], dict[str, str]]:
    """Sets of patches for a --split value, and the patient assignment (empty for random-patch)."""
    if split == "random-patch":
        return random_patch_split(patches, seed), {}
    if split == "patient":
        assignment = patient_split(counts_by_patient(patches), seed=seed)
    elif split in PUBLISHED_SPLITS:
        assignment = published_split(split)
    else:
        assignment = read_split_manifest(Path(split))
    return apply_split(patches, assignment), assignment
