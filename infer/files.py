"""Writing report files safely: atomic replacement and CSV cells that cannot become formulas."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import IdcError
from .schema import RESEARCH_NOTICE  # noqa: F401 - re-exported: many modules take it from here

# A cell starting with one of these is read as a formula by Excel, LibreOffice and Sheets.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes files owner-only; reports get the permissions any new file of the user gets
FILE_MODE = 0o666 & ~_current_umask()


def printable(text: str) -> str:
    """``text`` as any console prints it: the bytes of a file or folder name that are not UTF-8 (which Python
    carries as surrogate escapes) shown as \\xNN, where writing them raised UnicodeEncodeError and ended the run."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class PrintableFormatter(logging.Formatter):
    """Log lines that name a file whose name is not UTF-8 print (printable) instead of failing."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def stderr_log_handler() -> logging.Handler:
    """idc-infer's log lines on stderr (the CLI's, and its worker processes' the same way)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    return handler


def neutralise_cell(value: Any) -> Any:
    """Prefix text that a spreadsheet would evaluate with a quote; numbers pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


# names idc writes itself, and names Windows reserves for devices
RESERVED_STEMS = {
    "summary",
    "run",
    "report",
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


def safe_file_stem(name: str) -> str:
    """A file name stem from a patient id, safe on Windows and POSIX, never one of idc's own."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "_"
    stem = stem[:120]
    return f"{stem}_patient" if stem.casefold() in RESERVED_STEMS else stem


@contextlib.contextmanager
def atomic_path(target: Path, mode: str = "w", newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    # backslashreplace: a file name that is not valid UTF-8 (possible on Linux) must not crash a report
    kwargs: dict[str, Any] = (
        {} if "b" in mode else {"encoding": "utf-8", "errors": "backslashreplace", "newline": newline}
    )
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, FILE_MODE)
        _replace_with_retry(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _replace_with_retry(source: str, target: Path, attempts: int = 5, wait_s: float = 0.2) -> None:
    """os.replace, retried briefly: on Windows a virus scanner or an open viewer can hold the target."""
    for attempt in range(attempts):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise PermissionError(f"cannot replace {target}: is it open in another program?") from None
            time.sleep(wait_s)


class CsvOut:
    """A CSV writer whose text cells are neutralised; rows go straight to the (temp) file."""

    def __init__(self, handle, header: Sequence[str], write_header: bool = True):
        self.header = list(header)
        self._writer = csv.writer(handle, lineterminator="\n")
        # Python's csv quotes a cell holding "\n" but not one holding a lone "\r" when lines end in "\n":
        # readers then split the row there (and a "=..." after the CR became a cell of its own)
        self._quoted = csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_ALL)
        if write_header:
            self._writer.writerow(self.header)

    def row(self, values: dict[str, Any] | Any) -> None:
        """A dict by column name, or a dataclass row (schema.PatchRow) whose fields are the columns."""
        self._write([self._cells(values)])

    def rows(self, rows: Iterable[Any]) -> None:
        """Many rows, exactly as row() writes each: a batch's rows in one call (every patch goes through here)."""
        self._write([self._cells(values) for values in rows])

    def _cells(self, values: dict[str, Any] | Any) -> list[Any]:
        if isinstance(values, dict):
            return _cells([values.get(key) for key in self.header])
        return _cells([getattr(values, key, None) for key in self.header])

    def _write(self, lines: list[list[Any]]) -> None:
        has_cr = [any(isinstance(c, str) and "\r" in c for c in cells) for cells in lines]
        if any(has_cr):  # those rows quoted, one by one; the rest as usual
            for cells, quoted in zip(lines, has_cr):
                (self._quoted if quoted else self._writer).writerow(cells)
        else:
            self._writer.writerows(lines)


def _cells(values: list[Any]) -> list[Any]:
    """A row's CSV cells: text neutralised (neutralise_cell; a formatted negative number is a number, not a
    formula), floats with 6 decimals, None and nan (unknown, not zero) empty; one comprehension a row."""
    return [
        ""
        if value is None
        else ("" if value != value else f"{value:.6f}")
        if isinstance(value, float)
        else neutralise_cell(value)
        if isinstance(value, str)
        else value
        for value in values
    ]


def write_csv(target: Path, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with atomic_path(target, newline="") as handle:
        out = CsvOut(handle, header)
        for values in rows:
            out.row(values)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) as None: JSON has no NaN, and a file with a
    bare ``NaN`` token is refused by strict readers (browsers, jq, most languages)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(target: Path, payload: Any) -> None:
    with atomic_path(target) as handle:
        json.dump(finite_json(payload), handle, indent=2, sort_keys=True, default=str, allow_nan=False)
        handle.write("\n")


LOCK_NAME = ".idc-lock"


def remove_stale_temp_files(folder: Path) -> int:
    """Remove the half-written ``.<name>.*.tmp`` files atomic_path leaves when a run is killed (kill -9,
    power cut). Only called under the folder's lock: no other run can be writing them."""
    removed = 0
    for directory in (folder, folder / ".idc-state"):
        try:
            candidates = list(directory.glob(".*.tmp"))
        except OSError:
            continue
        for path in candidates:
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


class FolderBusyError(IdcError, RuntimeError):
    """Another idc process is writing the same output folder."""


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (its .idc-lock file) while writing reports into it.

    An operating-system lock (flock on POSIX, msvcrt.locking on Windows) on an open file: it goes
    away with the process, so a run killed with kill -9 or a power cut leaves no stale lock behind.
    A second run on the same folder gets FolderBusyError at once instead of interleaving its reports.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = open(path, "a+b")
    try:
        try:
            if sys.platform == "win32":  # os.name "nt", spelled so type checkers know msvcrt is there
                import msvcrt

                # a byte far past the pid text: Windows byte locks are mandatory, the holder's pid stays readable
                handle.seek(1 << 30)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):
                # a file system without locks (some NFS or FUSE mounts): go on unlocked rather than refuse forever
                logging.getLogger(__name__).warning(
                    "%s cannot be locked (%s): two runs into it would not be kept apart", folder, exc.strerror or exc
                )
                handle.seek(0)
                yield
                return
            handle.seek(0)
            try:
                holder = handle.read(200).decode("utf-8", "replace").strip() or "another process"
            except OSError:
                holder = "another process"
            raise FolderBusyError(
                f"{folder} is being written by another idc-infer run ({holder}); wait for it to "
                "finish or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}".encode())
        handle.flush()
        remove_stale_temp_files(folder)
        yield
    finally:
        handle.close()
