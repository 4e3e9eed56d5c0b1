from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from idc_infer.naming import is_candidate_image, label_from_parent, parse_patch_name, patient_dir_of


def test_parses_kaggle_name():
    name = parse_patch_name("10253_idx5_x1001_y451_class0.png")
    assert (name.patient_id, name.x, name.y, name.label) == ("10253", 1001, 451, 0)


def test_unlabelled_and_foreign_names():
    assert parse_patch_name("10253_idx5_x1_y2.png").label is None
    assert parse_patch_name("IMG_0001.png").patient_id is None
    assert parse_patch_name("10253_idx5_x1001_y451_class2.png").patient_id is None


@given(pid=st.integers(0, 10**7), x=st.integers(0, 10**6), y=st.integers(0, 10**6), label=st.sampled_from([0, 1]))
def test_name_round_trip(pid, x, y, label):
    name = parse_patch_name(f"{pid}_idx5_x{x}_y{y}_class{label}.png")
    assert (name.patient_id, name.x, name.y, name.label) == (str(pid), x, y, label)


@given(st.text(max_size=40))
def test_any_text_parses_to_all_fields_or_none_and_only_from_what_it_says(text):
    """Arbitrary names (a stray export, a typo) never raise; a parsed name's fields come from the text itself:
    the patient id and coordinates are written in it, and no coordinates come without a patient."""
    name = parse_patch_name(text)
    if name.patient_id is None:
        assert (name.x, name.y, name.label, name.width) == (None, None, None, None)
    else:
        assert name.x is not None and name.y is not None and name.x >= 0 and name.y >= 0
        assert name.patient_id in text and f"x{name.x}" in text.replace("x=", "x")
        assert name.label in (None, 0, 1)


@given(
    pid=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True),
    x=st.integers(0, 10**6),
    y=st.integers(0, 10**6),
    noise=st.sampled_from(["", "_class2", "_classX", " copy", "_x1"]),
)
def test_a_damaged_kaggle_name_is_not_half_parsed(pid, x, y, noise):
    """A name with something after the coordinates that is not a label is not taken for a labelled patch."""
    name = parse_patch_name(f"{pid}_idx5_x{x}_y{y}{noise}.png")
    if noise == "":
        assert name.patient_id is not None and name.label is None
    else:
        assert name.patient_id is None


def test_label_folders_and_patient_dir():
    path = Path("cohort/8863/1/a.png")
    assert label_from_parent(path) == 1
    assert patient_dir_of(path) == Path("cohort/8863")
    assert patient_dir_of(Path("cohort/8863/a.png")) == Path("cohort/8863")


def test_hidden_and_non_image_files_are_not_candidates():
    assert not is_candidate_image(".DS_Store")
    assert not is_candidate_image("._8863_idx5_x1_y1_class0.png")
    assert not is_candidate_image("Thumbs.db")
    assert not is_candidate_image("notes.txt")
    assert is_candidate_image("A.PNG") and is_candidate_image("b.jpg")
