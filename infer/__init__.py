"""idc inference: score IDC patches with an ONNX CancerNet on a lab PC (onnxruntime only)."""

import os

# Bound what OpenCV may decode before any module of the package imports cv2 (it reads this once,
# at import): a huge image refused per row must not take gigabytes first. Generous for any patch,
# far below a slide overview; preprocess also refuses PNG/JPEG headers beyond it without decoding.
MAX_DECODE_PIXELS = 8192 * 8192
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_DECODE_PIXELS))

__version__ = "0.2.0"


def code_version() -> str:
    """The package version, plus the git commit (and '-dirty') when running from a checkout.

    Recorded in every model's provenance, so two models made between releases can be told apart.
    """
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return __version__
    try:
        described = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{described}" if described else __version__
