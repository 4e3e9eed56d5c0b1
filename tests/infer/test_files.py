import csv

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idc_infer.files import FORMULA_PREFIXES, atomic_path, neutralise_cell, safe_file_stem, write_csv


@given(st.text())
def test_no_cell_starts_like_a_formula(text):
    cell = neutralise_cell(text)
    assert not cell.startswith(FORMULA_PREFIXES)
    assert cell == text or cell == "'" + text


def test_numbers_are_untouched_in_the_written_csv(tmp_path):
    write_csv(tmp_path / "n.csv", ["value", "text"], [{"value": -0.5, "text": "-0.5"}])
    assert (tmp_path / "n.csv").read_text().splitlines()[1] == "-0.500000,'-0.5"


def test_non_utf8_file_name_does_not_crash_a_report(tmp_path):
    write_csv(tmp_path / "u.csv", ["path"], [{"path": "caf\udce9.png"}])  # surrogate from os.scandir
    assert "caf" in (tmp_path / "u.csv").read_text()


def test_formula_file_name_is_inert_in_csv(tmp_path):
    target = tmp_path / "r.csv"
    write_csv(target, ["path"], [{"path": '=HYPERLINK("http://x").png'}])
    rows = list(csv.reader(target.open()))
    assert rows[1][0].startswith("'=")


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.csv"
    target.write_text("complete old report\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as handle:
            handle.write("half a new rep")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "complete old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]


@given(st.text(min_size=1, max_size=200))
def test_safe_file_stem_is_a_plain_name(text):
    stem = safe_file_stem(text)
    assert stem and "/" not in stem and "\\" not in stem and ":" not in stem and not stem.startswith(".")


def test_reports_get_ordinary_permissions(tmp_path):
    import os
    import stat

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_csv(tmp_path / "r.csv", ["a"], [{"a": 1}])
    assert stat.S_IMODE(os.stat(tmp_path / "r.csv").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_json_outputs_hold_no_nan_tokens(tmp_path):
    """NaN metrics (a class absent) are written as null: strict JSON readers accept the file."""
    import json
    import math

    from idc_infer.contract import Contract
    from idc_infer.files import write_json

    write_json(tmp_path / "m.json", {"auc": math.nan, "nested": [1.0, math.inf, {"x": -math.inf}]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auc": None, "nested": [1.0, None, {"x": None}]}
    contract = Contract(provenance={"metrics": {"roc_auc": math.nan}})
    assert "NaN" not in contract.to_json()
    assert Contract.from_json(contract.to_json()).provenance["metrics"]["roc_auc"] is None


def test_carriage_return_in_a_name_stays_inside_its_cell(tmp_path):
    """A file name holding '\\r' (legal on POSIX) must not split summary.csv into extra rows, nor let a
    '=...' after it become a cell of its own."""
    import csv

    from idc_infer.files import write_csv

    write_csv(
        tmp_path / "s.csv",
        ("patient_id", "n"),
        [{"patient_id": "p\r=HYPERLINK(1)", "n": 3}, {"patient_id": "q", "n": 4}],
    )
    with open(tmp_path / "s.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["patient_id", "n"], ["p\r=HYPERLINK(1)", "3"], ["q", "4"]]


def test_temp_files_left_by_a_killed_run_are_removed_under_the_lock(tmp_path):
    from idc_infer.files import folder_lock

    (tmp_path / ".idc-state").mkdir()
    stale = [tmp_path / ".summary.csv.x1y2.tmp", tmp_path / ".idc-state" / ".10253.json.a.tmp"]
    for path in stale:
        path.write_text("half")
    (tmp_path / "keep.tmp").write_text("not ours")
    with folder_lock(tmp_path):
        pass
    assert not any(p.exists() for p in stale) and (tmp_path / "keep.tmp").exists()


def test_idc_errors_share_one_root_and_keep_their_old_bases():
    """Callers may catch IdcError for everything idc raises on purpose; old handlers (ValueError) still work."""
    from idc_infer.contract import ContractError
    from idc_infer.errors import IdcError
    from idc_infer.files import FolderBusyError
    from idc_infer.model import ModelError
    from idc_infer.slides import SlideError

    for error, old_base in (
        (ModelError, ValueError),
        (ContractError, ValueError),
        (SlideError, ValueError),
        (FolderBusyError, RuntimeError),
    ):
        assert issubclass(error, IdcError) and issubclass(error, old_base)
    try:
        from idc_infer.model import load_model

        load_model("/nonexistent/model.onnx")
    except IdcError as exc:
        assert "does not exist" in str(exc)
    else:
        raise AssertionError("a missing model file must raise")


def test_a_batch_of_patch_rows_is_written_as_row_by_row_even_with_a_cr_in_one():
    """Workers write a batch's CSV rows in one call (CsvOut.rows); the text must be what row() gives one at a
    time: the row whose path holds a lone CR quoted, the others not, formulas neutralised, nan empty."""
    import csv
    import io

    from idc_infer.files import CsvOut
    from idc_infer.schema import PATCH_COLUMNS, PatchRow

    rows = [
        PatchRow("a.png", 0, 50, 50, 50, 0.25, 0, 1, "ok", ""),
        PatchRow("b\r=cmd.png", None, None, 40, 50, None, None, None, "corrupt", "truncated"),
        PatchRow("c.png", 100, 0, 50, 50, float("nan"), None, 0, "model_error", "-x"),
    ]
    batch, single = io.StringIO(), io.StringIO()
    CsvOut(batch, PATCH_COLUMNS, write_header=False).rows(rows)
    one = CsvOut(single, PATCH_COLUMNS, write_header=False)
    for row in rows:
        one.row(row)
    assert batch.getvalue() == single.getvalue()
    parsed = list(csv.reader(io.StringIO(batch.getvalue(), newline="")))
    assert [r[0] for r in parsed] == ["a.png", "b\r=cmd.png", "c.png"]  # one cell: the '=' stays inside
    assert parsed[0][5] == "0.250000" and parsed[2][5] == "" and parsed[2][-2] == "'-x"
    assert batch.getvalue().count('"') == 2 * len(PATCH_COLUMNS)  # only the CR row is quoted, every cell of it
    CsvOut(plain := io.StringIO(), PATCH_COLUMNS, write_header=False).rows([rows[0], rows[2]])
    assert '"' not in plain.getvalue()
