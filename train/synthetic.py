"""Synthetic IDC-like patches in the real Kaggle layout and names, for fast tests and demos.

Each patient is a small "slide" cut into a grid of 50x50 patches (x/y in steps of 50). An
IDC region (a disc) holds dense, dark, enlarged purple nuclei; elsewhere sparse small nuclei
on pink stroma and pale fat. Edge patches of the slide are cut short (undersized), as in the
real set. Deterministic from the seed. numpy + cv2 only: no TensorFlow.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import click
import cv2
import numpy as np

PATCH_PX = 50
SYNTHETIC_MARKER = "IDC_SYNTHETIC_DATA.txt"  # training on a root holding this marks the model demo

STROMA_RGB = np.array([232, 178, 206], dtype=np.float32)  # eosin pink
FAT_RGB = np.array([246, 238, 244], dtype=np.float32)  # pale, almost white
NUCLEUS_RGB = np.array([92, 52, 140], dtype=np.float32)  # haematoxylin purple
IDC_NUCLEUS_RGB = np.array([64, 30, 110], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticPatch:
    patient_id: str
    x: int
    y: int
    label: int
    path: Path


def render_patch(rng: np.random.Generator, label: int, width: int = PATCH_PX, height: int = PATCH_PX) -> np.ndarray:
    """One H&E-like RGB patch; IDC has many more, larger, darker nuclei."""
    stain = rng.normal(1.0, 0.04, size=3).astype(np.float32)  # slide-to-slide stain variation
    base = STROMA_RGB * stain
    image: np.ndarray = np.empty((height, width, 3), dtype=np.float32)  # cv2 returns its own array type
    image[:] = base
    # pale fat vacuoles, common in healthy breast tissue
    for _ in range(rng.integers(0, 2 if label else 4)):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(image, centre, int(rng.integers(5, 14)), FAT_RGB.tolist(), -1)
    n_nuclei = int(rng.integers(30, 55) if label else rng.integers(4, 14))
    colour = (IDC_NUCLEUS_RGB if label else NUCLEUS_RGB) * stain
    for _ in range(n_nuclei):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(2, 5) + 2 * label), int(rng.integers(2, 4) + label))
        shade = colour * rng.uniform(0.85, 1.15)
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, shade.tolist(), -1)
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0.6)
    return np.clip(image, 0, 255).astype(np.uint8)


def _patient_rng(seed: int, patient_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(patient_id.encode())])


def write_patient(
    root: Path,
    patient_id: str,
    seed: int = 0,
    grid: int = 6,
    idc_radius: float | None = None,
    undersized_edge: bool = True,
) -> list[SyntheticPatch]:
    """Write one patient's patches under ``root/<pid>/<0|1>/``; returns what was written."""
    rng = _patient_rng(seed, patient_id)
    if idc_radius is None:
        idc_radius = float(rng.uniform(0.25, 0.5)) * grid
    cx, cy = rng.uniform(0.3, 0.7, size=2) * grid
    written = []
    for row in range(grid):
        for col in range(grid):
            x, y = 1 + col * PATCH_PX, 1 + row * PATCH_PX
            label = int(np.hypot(col + 0.5 - cx, row + 0.5 - cy) <= idc_radius)
            width = height = PATCH_PX
            if undersized_edge and col == grid - 1 and row % 2 == 0:
                width = int(rng.integers(20, PATCH_PX))  # the slide ends inside this patch
            image = render_patch(rng, label, width, height)
            path = root / patient_id / str(label) / f"{patient_id}_idx5_x{x}_y{y}_class{label}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            # imencode + write_bytes: cv2.imwrite fails silently on non-ASCII Windows paths
            path.write_bytes(cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes())
            written.append(SyntheticPatch(patient_id, x, y, label, path))
    return written


def write_cohort(
    root: Path, n_patients: int = 6, seed: int = 0, grid: int = 6, first_id: int = 90001
) -> list[SyntheticPatch]:
    """A cohort of synthetic patients, ids ``first_id``..; a few patients have no IDC at all."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / SYNTHETIC_MARKER).write_text(
        "Synthetic patches written by idc-synth; models trained on them are demo models.\n"
    )
    patches: list[SyntheticPatch] = []
    for i in range(n_patients):
        pid = str(first_id + i)
        radius = 0.0 if i % 4 == 3 else None  # some healthy patients, as in real cohorts
        patches += write_patient(root, pid, seed=seed, grid=grid, idc_radius=radius)
    return patches


def write_faulty_files(patient_dir: Path, seed: int = 0) -> dict[str, str]:
    """Write the bad files a lab meets into a patient dir; returns file name -> expected status."""
    patient_dir = Path(patient_dir)
    patient_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = render_patch(rng, 1)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    good_png = cv2.imencode(".png", bgr)[1].tobytes()
    expected = {}

    def put(name: str, data: bytes, status: str) -> None:
        (patient_dir / name).write_bytes(data)
        expected[name] = status

    put("empty.png", b"", "empty_file")
    put("truncated.png", good_png[: len(good_png) // 2], "corrupt_image")
    put("notes.png", b"this is a text file with a .png name\n", "not_an_image")
    put("gray.png", cv2.imencode(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))[1].tobytes(), "ok")
    put("rgba.png", cv2.imencode(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))[1].tobytes(), "ok")
    put("deep16.png", cv2.imencode(".png", bgr.astype(np.uint16) * 257)[1].tobytes(), "ok")
    put("photo.jpg", cv2.imencode(".jpg", bgr)[1].tobytes(), "ok")
    put("edge.png", cv2.imencode(".png", bgr[:, :31])[1].tobytes(), "ok")
    put("huge.png", cv2.imencode(".png", cv2.resize(bgr, (120, 120)))[1].tobytes(), "oversized_refused")
    put("=HYPERLINK(1).png", good_png, "ok")
    palette = _palette_png(rgb)
    if palette is not None:
        put("palette.png", palette, "ok")
    (patient_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (patient_dir / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (patient_dir / "readme.txt").write_text("scanner notes\n")
    return expected


def _palette_png(rgb: np.ndarray) -> bytes | None:
    """An indexed-colour PNG, written by hand since cv2 cannot write palettes."""
    import struct

    colours, indices = np.unique(rgb.reshape(-1, 3) // 32 * 32, axis=0, return_inverse=True)
    if len(colours) > 256:
        return None
    height, width = rgb.shape[:2]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + bytes(row) for row in indices.reshape(height, width).astype(np.uint8))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", colours.astype(np.uint8).tobytes())
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--patients", type=click.IntRange(1), default=6, show_default=True)
@click.option("--grid", type=click.IntRange(2), default=6, show_default=True, help="Patches per side of each slide.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--faults", is_flag=True, help="Also write a patient dir full of bad files.")
def main(out_dir: Path, patients: int, grid: int, seed: int, faults: bool) -> None:
    """Write a synthetic cohort in the Kaggle layout (for tests, demos and benchmarks)."""
    written = write_cohort(out_dir, patients, seed, grid)
    if faults:
        write_faulty_files(out_dir / "faulty")
    click.echo(f"wrote {len(written)} synthetic patches for {patients} patients under {out_dir}")


if __name__ == "__main__":
    main()
