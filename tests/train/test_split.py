from hypothesis import given, settings
from hypothesis import strategies as st

from idc_train.data import (
    apply_split,
    counts_by_patient,
    discover_labelled,
    patient_split,
    read_split_manifest,
    write_split_manifest,
)

counts_strategy = st.dictionaries(
    st.integers(1000, 99999).map(str), st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=3, max_size=80
)


@given(counts=counts_strategy, seed=st.integers(0, 1000))
@settings(max_examples=60)
def test_every_patient_in_exactly_one_set(counts, seed):
    assignment = patient_split(counts, seed=seed)
    assert set(assignment) == set(counts)
    assert set(assignment.values()) <= {"train", "val", "test"}
    assert list(assignment.values()).count("val") >= 1 and list(assignment.values()).count("test") >= 1


@given(counts=counts_strategy, seed=st.integers(0, 1000))
@settings(max_examples=30)
def test_split_is_reproducible_from_seed(counts, seed):
    assert patient_split(counts, seed=seed) == patient_split(dict(reversed(list(counts.items()))), seed=seed)


def test_proportions_follow_80_10_10():
    counts = {str(i): (100, i) for i in range(100)}
    values = list(patient_split(counts, seed=1).values())
    assert (values.count("train"), values.count("val"), values.count("test")) == (80, 10, 10)


def test_no_patch_of_a_patient_on_two_sides(synthetic_cohort, tmp_path):
    patches = discover_labelled(synthetic_cohort)
    counts = counts_by_patient(patches)
    assignment = patient_split(counts, seed=4)
    sets = apply_split(patches, assignment)
    seen = {name: {p.patient_id for p in items} for name, items in sets.items()}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert sum(len(v) for v in sets.values()) == len(patches)
    write_split_manifest(tmp_path / "split.csv", assignment, counts)
    assert read_split_manifest(tmp_path / "split.csv") == assignment


def test_discovery_reads_labels_from_names_and_folders(tmp_path):
    import shutil

    from idc_train.synthetic import write_patient

    write_patient(tmp_path / "kaggle", "123", grid=3)
    (tmp_path / "folders" / "benign").mkdir(parents=True)
    (tmp_path / "folders" / "malignant").mkdir(parents=True)
    first = next((tmp_path / "kaggle").rglob("*.png"))
    shutil.copy(first, tmp_path / "folders" / "benign" / "a.png")
    shutil.copy(first, tmp_path / "folders" / "malignant" / "b.png")
    kaggle = discover_labelled(tmp_path / "kaggle")
    assert len(kaggle) == 9 and {p.patient_id for p in kaggle} == {"123"}
    assert sorted(p.label for p in discover_labelled(tmp_path / "folders")) == [0, 1]
    for pid in ("P1", "P2"):  # <pid>/benign|malignant/ layouts keep patients apart
        for cls in ("benign", "malignant"):
            (tmp_path / "per_patient" / pid / cls).mkdir(parents=True)
            shutil.copy(first, tmp_path / "per_patient" / pid / cls / "x.png")
    found = sorted((p.patient_id, p.label) for p in discover_labelled(tmp_path / "per_patient"))
    assert found == [("P1", 0), ("P1", 1), ("P2", 0), ("P2", 1)]


def test_breakhis_names_give_patient_and_label(tmp_path):
    import shutil

    from idc_train.synthetic import write_patient

    source = write_patient(tmp_path / "src", "1", grid=2)[0].path
    for rel in (
        "train/benign/SOB_B_A-14-22549AB-40-001.png",
        "train/malignant/SOB_M_DC-14-2523-400-007.png",
        "test/malignant/SOB_M_DC-14-2523-100-001.png",
    ):
        (tmp_path / "breakhis" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, tmp_path / "breakhis" / rel)
    found = {(p.path.name, p.patient_id, p.label) for p in discover_labelled(tmp_path / "breakhis")}
    assert found == {
        ("SOB_B_A-14-22549AB-40-001.png", "14-22549AB", 0),
        ("SOB_M_DC-14-2523-400-007.png", "14-2523", 1),
        ("SOB_M_DC-14-2523-100-001.png", "14-2523", 1),
    }


def _made_up_cohort(n: int, cohort_seed: int) -> dict[str, tuple[int, int]]:
    """n patients with 50..2000 patches each and IDC ratios skewed low, as in the Kaggle set."""
    import random

    rng = random.Random(cohort_seed)
    counts = {}
    for i in range(n):
        total = rng.randint(50, 2000)
        n_idc = round(total * rng.betavariate(1.2, 2.5))
        counts[str(8000 + i)] = (total - n_idc, n_idc)
    return counts


def _check_val_and_test_are_stratified(counts: dict[str, tuple[int, int]], seed: int) -> None:
    def ratio(pid):
        return counts[pid][1] / max(1, sum(counts[pid]))

    assignment = patient_split(counts, seed=seed)
    ranking = {pid: rank for rank, pid in enumerate(sorted(counts, key=lambda p: (ratio(p), p)))}
    last = len(counts) - 1
    mean = {}
    for name in ("train", "val", "test"):
        members = [pid for pid, set_name in assignment.items() if set_name == name]
        mean[name] = sum(ratio(pid) for pid in members) / len(members)
        ranks = [ranking[pid] for pid in members]
        assert min(ranks) <= 0.1 * last and max(ranks) >= 0.9 * last, (name, min(ranks), max(ranks), last)
    # after the fix the gap stays under 0.012 on 1200 such cohorts; before it was 0.05 typically, up to 0.18
    assert abs(mean["val"] - mean["train"]) < 0.03 and abs(mean["test"] - mean["train"]) < 0.03, mean


@given(n=st.integers(200, 400), cohort_seed=st.integers(0, 10_000), seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_val_and_test_span_the_whole_ratio_range_of_large_cohorts(n, cohort_seed, seed):
    _check_val_and_test_are_stratified(_made_up_cohort(n, cohort_seed), seed)


def test_top_ratio_patients_reach_val_and_test_in_a_279_patient_cohort():
    # the Kaggle release has 279 patients; blocks of 279 // 56 patients never reached ranks above 223
    counts = _made_up_cohort(279, 0)
    for seed in range(5):
        _check_val_and_test_are_stratified(counts, seed)
        values = list(patient_split(counts, seed=seed).values())
        assert (values.count("train"), values.count("val"), values.count("test")) == (223, 28, 28)
