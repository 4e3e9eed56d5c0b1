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

from idc_infer.errors import IdcError
from idc_infer.naming import LABEL_DIRS, is_candidate_image, parse_patch_name


class TrainingDataError(IdcError, ValueError):
    """The data, split or manifest cannot train a model (missing class, empty set, unreadable manifest...):
    the commands turn it into a usage error; any other ValueError is a bug and keeps its traceback."""


log = logging.getLogger(__name__)

# BreakHis: SOB_<B|M>_<tumour type>-<year>-<slide id>-<magnification>-<seq>.png
BREAKHIS_NAME = re.compile(r"^SOB_(?P<cls>[BM])_[A-Z]+-(?P<patient>\d+-[A-Za-z0-9]+)-\d+-\d+\.\w+$")
SET_NAMES = ("train", "val", "test")
# Folder names that mark a dataset's own sets (BreakHis-style train/ val/ test/ trees), lower case.
SET_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
PUBLISHED_SPLITS = ("janowczyk2016",)
SPLIT_METHODS = ("patient", "folders", *PUBLISHED_SPLITS, "random-patch")
SPLIT_CHOICES_TEXT = ", ".join(repr(m) for m in SPLIT_METHODS) + " or a CSV manifest with the columns patient_id,set"
LEAKY_WARNING = (
    "--split random-patch puts patches of the same patient on both sides: metrics are inflated and do not "
    "say how the model does on a new patient (reproduces the seed tutorial only)"
)


@dataclass(frozen=True)
class LabelledPatch:
    path: Path
    patient_id: str
    label: int
    set_folder: str | None = None  # "train"/"val"/"test" when the data has its own set folders, else None


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
    if (
        folder.name.lower() in LABEL_DIRS
        and folder.parent != data_dir
        and folder.parent.name.lower() not in SET_FOLDERS
    ):
        return folder.parent.name
    return folder.name


def _label_of(path: Path) -> int | None:
    parsed = parse_patch_name(path.name).label
    if parsed is not None:
        return parsed
    breakhis = BREAKHIS_NAME.match(path.name)
    if breakhis:
        return int(breakhis.group("cls") == "M")
    return LABEL_DIRS.get(path.parent.name.lower())


def is_class_folder_id(patient_id: str) -> bool:
    """A stand-in id ("0", "benign"...) given to patches whose patient is unknown: their class folder's name."""
    return patient_id.lower() in LABEL_DIRS


def _set_folder_of(path: Path, data_dir: Path) -> str | None:
    """train/val/test when a folder between ``data_dir`` and the file is named so (the nearest wins)."""
    for part in reversed(path.relative_to(data_dir).parts[:-1]):
        if part.lower() in SET_FOLDERS:
            return SET_FOLDERS[part.lower()]
    return None


def discover_labelled(data_dir: Path) -> list[LabelledPatch]:
    """Every labelled image under ``data_dir`` (Kaggle or class-folder layout), sorted by path.

    A patch under a train/, val/ (valid/, validation/) or test/ folder records it as ``set_folder``,
    for ``--split folders``."""
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
        patches.append(LabelledPatch(path, _patient_of(path, data_dir), label, _set_folder_of(path, data_dir)))
    if unlabelled:
        log.warning("%d image(s) under %s carry no label and were left out", unlabelled, data_dir)
    folder_ids = sorted({p.patient_id for p in patches if is_class_folder_id(p.patient_id)})
    if folder_ids:
        log.warning(
            "patient ids of some patches could not be read from their file names (they got the class "
            "folder names %s): a patient-level split cannot keep those patients apart%s",
            ", ".join(folder_ids),
            "; the data has its own train/val/test folders, which --split folders keeps as the sets"
            if any(p.set_folder for p in patches)
            else "",
        )
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

    Patients are sorted by their IDC ratio and cut into as many blocks as there are val + test
    places, the blocks spanning the whole ranking; the seed picks one patient of each block and
    which of neighbouring blocks gives val and which test, so val and test each span the range of
    ratios and their mean ratio stays close to train's. Val and test get at least one patient each
    when there are three or more patients.
    """
    rng = random.Random(seed)
    pids = sorted(patient_counts, key=lambda p: (patient_counts[p][1] / max(1, sum(patient_counts[p])), p))
    n = len(pids)
    n_val = max(1 if n >= 3 else 0, round(n * fractions[1]))
    n_test = min(max(1 if n >= 3 else 0, round(n * fractions[2])), n - n_val)
    n_eval = n_val + n_test
    assignment = {}
    if n_eval:
        # Block edges at round(i * n / n_eval): the blocks tile the whole ranking, top ratios included
        # (a fixed n // n_eval block left the top ~20% of a 279-patient cohort out of val and test).
        edges = [round(i * n / n_eval) for i in range(n_eval + 1)]
        picks = [rng.choice(pids[edges[i] : edges[i + 1]]) for i in range(n_eval)]
        # Spread val and test evenly over the blocks, then shuffle each neighbouring pair by the seed,
        # so each of them spans the ratio range rather than landing on one end of it by chance.
        # (With two blocks, as in cohorts under 15 patients, this draws exactly as the earlier code did.)
        roles = ["val" if -(-(i + 1) * n_val // n_eval) > -(-i * n_val // n_eval) else "test" for i in range(n_eval)]
        for i in range(0, n_eval - 1, 2):
            pair = roles[i : i + 2]
            rng.shuffle(pair)
            roles[i : i + 2] = pair
        assignment = dict(zip(picks, roles))
    for pid in pids:
        assignment.setdefault(pid, "train")
    return dict(sorted(assignment.items()))


def read_split_manifest(path: Path) -> dict[str, str]:
    """A split manifest: CSV with columns patient_id,set (set in train/val/test); other columns are ignored."""
    path = Path(path)
    expected = f"a split manifest is a CSV with the columns patient_id,set (set one of {', '.join(SET_NAMES)})"
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: manifests saved by Excel
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in reader.fieldnames or ()]
            if not {"patient_id", "set"} <= set(columns):
                raise TrainingDataError(f"{path}: {expected}; its columns are {','.join(columns) or '(none)'}")
            reader.fieldnames = columns  # " set" and "set" alike
            assignment: dict[str, str] = {}
            for row in reader:
                pid = (row.get("patient_id") or "").strip()
                set_name = (row.get("set") or "").strip().lower()
                if not pid:
                    raise TrainingDataError(f"{path}, line {reader.line_num}: no patient_id; {expected}")
                if set_name not in SET_NAMES:
                    raise TrainingDataError(
                        f"{path}, line {reader.line_num}: set {row.get('set')!r} of patient {pid} is "
                        f"not one of {', '.join(SET_NAMES)}"
                    )
                if assignment.get(pid, set_name) != set_name:
                    raise TrainingDataError(
                        f"{path}, line {reader.line_num}: patient {pid} is in both {assignment[pid]} and "
                        f"{set_name}; a patient belongs to one set"
                    )
                assignment[pid] = set_name
    except UnicodeDecodeError as exc:
        raise TrainingDataError(f"{path}: not a UTF-8 text file ({exc.reason}); {expected}") from None
    except csv.Error as exc:
        raise TrainingDataError(f"{path}: not a readable CSV ({exc}); {expected}") from None
    return assignment


def write_split_manifest(path: Path, assignment: dict[str, str], counts: dict[str, tuple[int, int]]) -> None:
    from idc_infer.files import write_csv

    rows = [
        {"patient_id": pid, "set": name, "n_non_idc": counts.get(pid, (0, 0))[0], "n_idc": counts.get(pid, (0, 0))[1]}
        for pid, name in sorted(assignment.items())
    ]
    write_csv(Path(path), ("patient_id", "set", "n_non_idc", "n_idc"), rows)


def _examples(ids, limit: int = 10) -> str:
    ids = sorted(ids, key=lambda pid: (len(pid), pid))  # numeric ids in numeric order
    return ", ".join(ids[:limit]) + (f" ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def apply_split(
    patches: list[LabelledPatch], assignment: dict[str, str], split_name: str = "the split"
) -> dict[str, list[LabelledPatch]]:
    """Patches by set of a patient -> set assignment (a manifest, a published split).

    Says what does not match: split patients absent from the data (warning), a set left with no
    patient (warning), data patients the split does not mention (warning; they are left out).
    Raises ValueError when no patient of the data is in the split at all: the ids do not match.
    """
    sets: dict[str, list[LabelledPatch]] = {name: [] for name in SET_NAMES}
    if not patches:
        return sets
    data_pids = {patch.patient_id for patch in patches}
    if not data_pids & set(assignment):
        split_example = f"e.g. {_examples(assignment, 3)}" if assignment else "it lists no patients"
        raise TrainingDataError(
            f"the data's patient ids do not match {split_name}: none of the {len(data_pids)} patients in "
            f"the data (e.g. {_examples(data_pids, 3)}) is among its {len(assignment)} ({split_example})"
        )
    left_out: Counter = Counter()
    for patch in patches:
        name = assignment.get(patch.patient_id)
        if name is None:
            left_out[patch.patient_id] += 1
            continue
        sets[name].append(patch)
    absent = set(assignment) - data_pids
    if absent:
        log.warning(
            "%d of the %d patient(s) of %s are not in the data: %s",
            len(absent),
            len(assignment),
            split_name,
            _examples(absent),
        )
    for name in SET_NAMES:
        if not sets[name]:
            listed = sum(1 for set_name in assignment.values() if set_name == name)
            log.warning(
                "the %s set is empty: %s",
                name,
                f"none of the {listed} {name} patient(s) of {split_name} is in the data"
                if listed
                else f"{split_name} puts no patient in it",
            )
    if left_out:
        log.warning(
            "%d of the %d patient(s) in the data (%d patches) are not in %s and were left out: %s",
            len(left_out),
            len(data_pids),
            sum(left_out.values()),
            split_name,
            _examples(left_out),
        )
    return sets


def folder_split(patches: list[LabelledPatch]) -> tuple[dict[str, list[LabelledPatch]], dict[str, str]]:
    """The dataset's own train/val/test folders as the sets (``--split folders``), and each patient's set(s).

    A patient whose patches lie in more than one folder is recorded as e.g. ``train+test`` and
    warned about: the dataset's authors let it leak, and the metrics are inflated by it."""
    sets: dict[str, list[LabelledPatch]] = {name: [] for name in SET_NAMES}
    outside = [patch for patch in patches if patch.set_folder is None]
    if len(outside) == len(patches):
        raise TrainingDataError(
            "--split folders needs the data in train/, val/ and test/ folders (each holding class "
            "folders or Kaggle-named patches); this data has none: use --split patient"
        )
    if outside:
        log.warning(
            "%d patch(es) lie outside the train/val/test folders and were left out (e.g. %s)",
            len(outside),
            outside[0].path,
        )
    folders_of: dict[str, set[str]] = defaultdict(set)
    for patch in patches:
        if patch.set_folder is not None:
            sets[patch.set_folder].append(patch)
            folders_of[patch.patient_id].add(patch.set_folder)
    for name in SET_NAMES:
        if not sets[name]:
            log.warning("the %s set is empty: the data has no %s/ folder with labelled patches", name, name)
    leaking = sorted(pid for pid, names in folders_of.items() if len(names) > 1 and not is_class_folder_id(pid))
    if leaking:
        log.warning(
            "%d patient(s) have patches in more than one of the train/val/test folders (%s): the dataset's "
            "own split leaks them, so its metrics are inflated",
            len(leaking),
            _examples(leaking),
        )
    return sets, {pid: "+".join(sorted(names)) for pid, names in sorted(folders_of.items())}


def published_split(name: str) -> dict[str, str]:
    """A published patient split shipped with idc (train.txt/val.txt/test.txt of patient ids)."""
    if name not in PUBLISHED_SPLITS:
        raise TrainingDataError(f"unknown published split {name!r}; known: {', '.join(PUBLISHED_SPLITS)}")
    folder = importlib.resources.files("idc_train") / "splits" / name
    assignment = {}
    for set_name in SET_NAMES:
        for line in (folder / f"{set_name}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                assignment[line.strip()] = set_name
    return assignment


def random_patch_split(
    patches: list[LabelledPatch], seed: int = 0, fractions=(0.8, 0.1, 0.1)
) -> dict[str, list[LabelledPatch]]:
    """The seed tutorial's per-patch split: leaks patients across sets (kept only to reproduce it)."""
    log.warning(LEAKY_WARNING)
    shuffled = list(patches)
    random.Random(seed).shuffle(shuffled)
    n_train = round(len(shuffled) * fractions[0])
    n_val = round(len(shuffled) * fractions[1])
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }


def check_split(split: str) -> None:
    """ValueError unless ``split`` is a known method or an existing manifest file."""
    if split not in SPLIT_METHODS and not Path(split).is_file():
        raise TrainingDataError(
            f"--split {split!r} is neither a split method nor an existing manifest file; choose {SPLIT_CHOICES_TEXT}"
        )


def resolve_split(
    split: str, patches: list[LabelledPatch], seed: int = 0
) -> tuple[dict[str, list[LabelledPatch]], dict[str, str]]:
    """Sets of patches for a --split value, and the patient assignment (empty for random-patch)."""
    check_split(split)
    if split == "random-patch":
        return random_patch_split(patches, seed), {}
    if split == "folders":
        return folder_split(patches)
    if split == "patient":
        if any(patch.set_folder for patch in patches):
            if all(is_class_folder_id(patch.patient_id) for patch in patches):
                raise TrainingDataError(
                    "--split patient needs patient ids, and the file names of this data carry none (they "
                    "lie in train/val/test and class folders): use --split folders to keep the dataset's "
                    "own sets"
                )
            log.warning(
                "the data comes in its own train/val/test folders; --split patient ignores them and splits "
                "the patients anew (--split folders keeps the dataset's sets)"
            )
        assignment = patient_split(counts_by_patient(patches), seed=seed)
        return apply_split(patches, assignment, "the patient split"), assignment
    if split in PUBLISHED_SPLITS:
        assignment = published_split(split)
        data_pids = {patch.patient_id for patch in patches}
        sets = apply_split(patches, assignment, f"the published split {split}")
        if patches and set(assignment) - data_pids:
            log.warning(
                "some patients of %s are missing from the data: results are not on the same folds as the "
                "published numbers and cannot be compared with them",
                split,
            )
        return sets, assignment
    assignment = read_split_manifest(Path(split))
    return apply_split(patches, assignment, f"the split manifest {split}"), assignment


@dataclass(frozen=True)
class SampleDesign:
    """How the patches of a data directory were sampled, where its manifest.csv / patients.csv say so
    (as in shared/data/idc-real): which patches are a uniform random sample of their patient and which
    patients are whole (every patch of the slide, so their true IDC fraction is known)."""

    uniform: frozenset[Path] = frozenset()
    whole_patients: frozenset[str] = frozenset()


def read_sample_design(data_dir: Path) -> SampleDesign:
    """The SampleDesign of ``data_dir`` from its manifest.csv (path, uniform_sample) and patients.csv
    (patient_id, whole_patient); an empty design when they are absent or lack those columns."""
    data_dir = Path(data_dir)
    uniform: set[Path] = set()
    whole: set[str] = set()
    manifest, patients = data_dir / "manifest.csv", data_dir / "patients.csv"
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                if (row.get("uniform_sample") or "").strip() == "1" and row.get("path"):
                    uniform.add(data_dir / row["path"])
    if patients.is_file():
        with open(patients, newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                if (row.get("whole_patient") or "").strip().lower() == "yes" and row.get("patient_id"):
                    whole.add(row["patient_id"].strip())
    return SampleDesign(frozenset(uniform), frozenset(whole))


def fits_contract(path: str | Path, contract) -> bool:
    """Whether idc-infer would score this file's size under the contract's refuse policies, from its header
    (a file whose header does not tell its size is kept: idc-infer decodes it and judges then)."""
    from idc_infer.preprocess import header_size, refused_size

    try:
        with open(path, "rb") as handle:
            size = header_size(handle.read(64 * 1024))
    except OSError:
        return True  # unreadable: TF's decode will say so, as before
    return size is None or refused_size(*size, contract) is None


def drop_refused_sizes(sets: dict[str, list[LabelledPatch]], contract) -> dict[str, list[LabelledPatch]]:
    """Each set without the patches idc-infer would refuse for their size (a 60x60 crop under oversized
    'refuse'): the model is neither trained nor judged on pixels inference never scores. Done once, before
    labels, weights and class checks are derived; the count is logged."""
    if contract.undersized_policy != "refuse" and contract.oversized_policy != "refuse":
        return sets
    kept = {name: [p for p in patches if fits_contract(p.path, contract)] for name, patches in sets.items()}
    for name in sets:
        if len(kept[name]) < len(sets[name]):
            log.warning(
                "%s set: %d of %d patches left out, their size refused by the contract (as idc-infer refuses them)",
                name,
                len(sets[name]) - len(kept[name]),
                len(sets[name]),
            )
    return kept
