"""mypy passes on idc_infer, idc_train and idc_export with the repository's config (pyproject.toml [tool.mypy]).

An editable install (pip install -e) is invisible to mypy (its import hook is not a folder mypy can search), so
unless the packages are installed as real folders the test checks the checkout itself: a tree of links named after
the packages (idc_infer -> infer, ...) on MYPYPATH, as setup.cfg's package_dir maps them.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"idc_infer": "infer", "idc_train": "train", "idc_export": "export"}


def _installed_as_folders() -> bool:
    """Whether every package is importable from a folder of its own name outside the checkout (a wheel or
    non-editable install, with its py.typed marker): mypy then finds them on its own."""
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            return False
        folder = Path(spec.origin).resolve().parent
        if folder.name != name or REPO in folder.parents or not (folder / "py.typed").is_file():
            return False
    return True


def _link_tree(root: Path) -> Path:
    """root/idc_infer -> REPO/infer and so on (copies where the file system refuses links)."""
    root.mkdir()
    for name, source in PACKAGES.items():
        try:
            (root / name).symlink_to(REPO / source, target_is_directory=True)
        except OSError:  # Windows without the symlink privilege
            shutil.copytree(REPO / source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_mypy_passes(tmp_path):
    assert importlib.util.find_spec("mypy"), "mypy is missing: it is part of the test extras (pip install '.[test]')"
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    if not _installed_as_folders():
        env["MYPYPATH"] = str(_link_tree(tmp_path / "src"))
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(REPO / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "mypy-cache"),
        *(arg for name in PACKAGES for arg in ("-p", name)),
    ]
    # a fresh cache in tmp_path: a few seconds cold, and nothing left in the checkout
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, f"mypy found problems ({' '.join(command)}):\n{done.stdout}{done.stderr}"
