"""Whole-slide images as patients: tissue found on a low-resolution level, tiles cut at the model's scale.

A slide (SVS, NDPI, generic pyramidal TIFF...: whatever tiffslide reads; MRXS and the rest where OpenSlide
is installed) is one patient. Its pixel size (microns per pixel, MPP) comes from the file or ``--mpp``,
never from a guess. A tile spans ``native_patch_px * patch_mpp`` microns, the physical size of the model's
training patches (``Contract.patch_mpp``), so at 0.25 um/px a 50 px patch of 4 um/px is a 800 px tile.
Each tile is read from the pyramid level just finer than the tile needs, area-resized to the native patch
size and scored in memory like a decoded PNG; no tile is written (idc-tile writes them for those who want
the folder). Rows carry x, y and the tile's size in level-0 pixels, so the GeoJSON lands on the slide.

Tissue: the slide is read band by band (one tile row high) at the level nearest 8 px per tile, and a tile
is kept when at least ``min_tissue`` of its pixels pass the same tissue test as patch quality control
(idc_infer.quality): glass and black padding are skipped, counted, and their area is stated.
Memory: one band of the low-resolution level and one tile per decode worker, whatever the slide's size.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .contract import Contract
from .discover import Patient, SkipCounter
from .errors import IdcError
from .preprocess import Decoded, decode_rgb
from .quality import DEFAULT_MIN_TISSUE, QualityControl, tissue_mask
from .schema import STATUS_NO_MPP, STATUS_SLIDE_UNREADABLE, STATUS_UNREADABLE

log = logging.getLogger(__name__)

# what tiffslide reads (Aperio SVS, Hamamatsu NDPI, Leica SCN, Ventana BIF, generic and OME/QP TIFF) and what
# OpenSlide adds where it is installed (3DHistech MRXS, Philips TIFF, Hamamatsu VMS, Sakura SVSLIDE)
SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff", ".qptiff", ".mrxs", ".vms", ".vmu", ".svslide")
MPP_PROPERTIES = (("tiffslide.mpp-x", "tiffslide.mpp-y"), ("openslide.mpp-x", "openslide.mpp-y"))
MASK_PX_PER_TILE = 8  # tissue is judged on about 8x8 low-resolution pixels per tile
SLIDES_EXTRA_HINT = "reading slides needs the [slides] extra: pip install 'idc[slides]' (tiffslide, imagecodecs)"


class SlideError(IdcError, ValueError):
    """A slide that cannot be tiled: unreadable, or its pixel size unknown."""

    def __init__(self, message: str, status: str = STATUS_SLIDE_UNREADABLE):
        super().__init__(message)
        self.status = status


def is_slide_path(path: Path) -> bool:
    """A file given on the command line with a slide's suffix (a folder is a patient or a cohort)."""
    return path.suffix.lower() in SLIDE_SUFFIXES and not path.is_dir()


def slide_id_of(path: Path) -> str:
    """The patient id of a slide: its file name without the suffix, in the characters a Kaggle-style
    patch name carries (idc-tile's file names parse back to the same id)."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in stem).strip(".")
    return cleaned if cleaned and cleaned[0].isalnum() else f"slide-{cleaned}"


class SlideReader:
    """The little idc needs of a slide, over tiffslide or OpenSlide (same method names)."""

    def __init__(self, handle: Any, backend: str):
        self._handle = handle
        self.backend = backend
        self._lock = threading.Lock()  # decode workers share one handle; its file reads are not reentrant
        self.dimensions: tuple[int, int] = tuple(handle.dimensions)
        self.level_dimensions = [tuple(d) for d in handle.level_dimensions]
        self.level_downsamples = [float(d) for d in handle.level_downsamples]
        self.properties = dict(handle.properties)

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """8-bit RGB pixels of a region: (x, y) in level-0 pixels, width x height in ``level``'s pixels."""
        with self._lock:
            if self.backend == "tiffslide":
                region = self._handle.read_region((x, y), level, (width, height), as_array=True)
            else:
                region = np.asarray(self._handle.read_region((x, y), level, (width, height)))
        region = np.asarray(region)
        if region.ndim == 2:
            region = np.repeat(region[:, :, None], 3, axis=2)
        if region.shape[2] == 4:  # OpenSlide: RGBA, transparent (no scan) as 0 alpha: shown as black, not tissue
            region = np.where(region[:, :, 3:4] == 0, 0, region[:, :, :3])
        return np.ascontiguousarray(region[:, :, :3], dtype=np.uint8)

    def close(self) -> None:
        with self._lock:  # never while a worker thread is still reading a region
            self._handle.close()


def open_slide(path: Path) -> SlideReader:
    """tiffslide first (pure Python wheels, Windows lab PCs included), OpenSlide where installed."""
    errors = []
    readers = 0
    try:
        import tiffslide
    except ImportError:
        pass
    else:
        readers += 1
        try:
            return SlideReader(tiffslide.TiffSlide(os.fspath(path)), "tiffslide")
        except Exception as exc:  # noqa: BLE001 - any reader failure is this slide's row, not the run's end
            errors.append(f"tiffslide: {exc}")
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the Python package without its C library
        pass
    else:
        readers += 1
        try:
            return SlideReader(openslide.OpenSlide(os.fspath(path)), "openslide")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"openslide: {exc}")
    if not readers:
        raise SlideError(f"{path.name}: {SLIDES_EXTRA_HINT}")
    raise SlideError(f"{path.name} cannot be read as a slide ({'; '.join(errors)})")


def slide_mpp(reader: SlideReader, path: Path, override: float | None) -> tuple[float, str]:
    """(microns per level-0 pixel, where it came from). Missing or absurd metadata is an error naming the slide
    and the fields, never a guess: the wrong scale scores every tile at the wrong magnification."""
    if override is not None:
        return float(override), "--mpp"
    for keys in MPP_PROPERTIES:
        values = [reader.properties.get(k) for k in keys]
        if values[0] is None:
            continue
        try:
            mpp_x, mpp_y = (float(v) for v in (values[0], values[1] if values[1] is not None else values[0]))
        except (TypeError, ValueError):
            continue
        if not (0.01 <= mpp_x <= 100 and 0.01 <= mpp_y <= 100):
            raise SlideError(
                f"{path.name}: {keys[0]} = {values[0]!r} is not a plausible pixel size in microns; "
                "pass the slide's real pixel size with --mpp",
                STATUS_NO_MPP,
            )
        if abs(mpp_x - mpp_y) > 0.02 * max(mpp_x, mpp_y):
            raise SlideError(
                f"{path.name}: pixels are not square ({keys[0]} {mpp_x}, {keys[1]} {mpp_y}); "
                "idc cuts square tiles only",
                STATUS_NO_MPP,
            )
        return (mpp_x + mpp_y) / 2, f"{keys[0]} in the file"
    raise SlideError(
        f"{path.name} records no pixel size ({' / '.join(k[0] for k in MPP_PROPERTIES)} missing): "
        "pass it with --mpp (microns per pixel of the full-resolution scan, e.g. 0.25 for 40x)",
        STATUS_NO_MPP,
    )


def best_level(downsamples: list[float], wanted: float) -> int:
    """The coarsest level no coarser than ``wanted``: read there, the image is only ever shrunk."""
    fitting = [i for i, d in enumerate(downsamples) if d <= wanted * (1 + 1e-6)]
    return max(fitting, key=lambda i: downsamples[i]) if fitting else 0


@dataclass(frozen=True)
class TileRef:
    """One tile of a slide: grid column and row, and its square in level-0 pixels."""

    col: int
    row: int
    x: int
    y: int
    size: int

    @property
    def fingerprint(self) -> str:
        return f"{self.col},{self.row},{self.x},{self.y},{self.size}"


@dataclass(frozen=True)
class SlideFailure:
    """A slide that yields no tiles: its one row says why."""

    status: str
    message: str
    fingerprint: str = "slide failure"


@dataclass
class SlideStats:
    """What tissue detection found, for the summary's notes and run.json."""

    mpp: float | None = None
    mpp_source: str = ""
    tile_px_level0: int | None = None
    read_level: int | None = None
    read_level_downsample: float | None = None
    mask_level: int | None = None
    backend: str = ""
    level0_size: tuple[int, int] | None = None
    n_grid_tiles: int = 0
    n_tissue_tiles: int = 0
    n_glass_tiles: int = 0
    tissue_area_mm2: float = 0.0
    error: str | None = None

    def note(self) -> str:
        if self.error:
            return f"slide not scored: {self.error}"
        return (
            f"slide at {self.mpp:.3f} um/px ({self.mpp_source}); tiles {self.tile_px_level0} px at level 0; "
            f"{self.n_tissue_tiles} of {self.n_grid_tiles} tiles with tissue, {self.n_glass_tiles} skipped as "
            f"glass; tissue area {self.tissue_area_mm2:.2f} mm2"
        )

    def record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class SlideTiler:
    """Plans and reads the tiles of one slide at a contract's scale."""

    path: Path
    patch_mpp: float
    native_px: int
    mpp_override: float | None = None
    min_tissue: float = DEFAULT_MIN_TISSUE
    stats: SlideStats = field(default_factory=SlideStats)
    reader: SlideReader | None = None

    def open(self) -> None:
        self.reader = open_slide(self.path)
        self.stats.backend = self.reader.backend
        self.stats.level0_size = self.reader.dimensions
        mpp, source = slide_mpp(self.reader, self.path, self.mpp_override)
        self.stats.mpp, self.stats.mpp_source = mpp, source
        self.tile0 = self.native_px * self.patch_mpp / mpp  # level-0 px per tile (fractional)
        if self.tile0 < self.native_px * 0.5:
            raise SlideError(
                f"{self.path.name}: at {mpp} um/px a {self.native_px * self.patch_mpp:g} um tile is "
                f"{self.tile0:.1f} px, under half the model's {self.native_px} px patch: the scan is "
                "coarser than the model's training patches",
                STATUS_NO_MPP,
            )
        self.stats.tile_px_level0 = round(self.tile0)
        downsamples = self.reader.level_downsamples
        self.level = best_level(downsamples, self.tile0 / self.native_px)
        self.level_ds = downsamples[self.level]
        self.level_tile_px = max(1, round(self.tile0 / self.level_ds))
        self.stats.read_level, self.stats.read_level_downsample = self.level, self.level_ds
        self.mask_level = best_level(downsamples, self.tile0 / MASK_PX_PER_TILE)
        self.stats.mask_level = self.mask_level
        width, height = self.reader.dimensions
        self.cols = int(width // self.tile0)
        self.rows = int(height // self.tile0)

    def _edges(self, n: int) -> list[int]:
        return [round(i * self.tile0) for i in range(n + 1)]

    def tiles(self) -> Iterator[TileRef]:
        """Tissue tiles in row-major order; counts glass as it goes. One band of the mask level in memory."""
        assert self.reader is not None
        xs, ys = self._edges(self.cols), self._edges(self.rows)
        ds = self.reader.level_downsamples[self.mask_level]
        level_w = self.reader.level_dimensions[self.mask_level][0]
        col_edges = np.clip(np.round(np.array(xs) / ds).astype(int), 0, level_w)
        size0 = round(self.tile0)
        mpp = self.stats.mpp
        assert mpp is not None  # open() sets it or raises
        for r in range(self.rows):
            top, bottom = ys[r], ys[r + 1]
            band_h = max(1, round((bottom - top) / ds))
            band = self.reader.read(0, top, self.mask_level, level_w, band_h)
            column_tissue = np.concatenate([[0], np.cumsum(tissue_mask(band).sum(axis=0))])
            for c in range(self.cols):
                a, b = col_edges[c], max(col_edges[c + 1], col_edges[c] + 1)
                fraction = (column_tissue[min(b, level_w)] - column_tissue[a]) / (band_h * (b - a))
                self.stats.n_grid_tiles += 1
                self.stats.tissue_area_mm2 += fraction * (self.tile0 * mpp / 1000) ** 2
                if fraction < self.min_tissue:
                    self.stats.n_glass_tiles += 1
                    continue
                self.stats.n_tissue_tiles += 1
                yield TileRef(c, r, xs[c], top, size0)

    def read_tile(self, tile: TileRef) -> np.ndarray:
        """The tile at the native patch size (area-averaged from the level just finer than needed)."""
        assert self.reader is not None
        region = self.reader.read(tile.x, tile.y, self.level, self.level_tile_px, self.level_tile_px)
        if region.shape[0] != self.native_px or region.shape[1] != self.native_px:
            region = cv2.resize(region, (self.native_px, self.native_px), interpolation=cv2.INTER_AREA)
        return region

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


@dataclass(kw_only=True)
class SlidePatient(Patient):
    """A slide scored as one patient: its items are tiles, read in memory. Its own fields are keyword-only
    (after Patient's defaulted ones): the slide file and the model's patch scale have no default."""

    slide: Path
    patch_mpp: float
    native_px: int = 50
    mpp_override: float | None = None
    min_tissue: float = DEFAULT_MIN_TISSUE
    stats: SlideStats = field(default_factory=SlideStats)
    _tiler: SlideTiler | None = None

    @property
    def frame_scale(self) -> float:
        """Level-0 pixels per native patch pixel: the mosaic is drawn at the patch scale, not level 0's."""
        tile = self.stats.tile_px_level0
        return tile / self.native_px if tile else 1.0

    def iter_paths(self, skipped: SkipCounter | None = None) -> Iterator[Any]:
        self.stats = SlideStats()
        tiler = SlideTiler(self.slide, self.patch_mpp, self.native_px, self.mpp_override, self.min_tissue, self.stats)
        try:
            tiler.open()
        except SlideError as exc:
            tiler.close()
            self.stats.error = str(exc)
            log.warning("slide %s: %s", self.slide, exc)
            yield SlideFailure(exc.status, str(exc))
            return
        self._tiler = tiler
        try:
            yield from tiler.tiles()
        except Exception as exc:  # noqa: BLE001 - a damaged slide is its own row; the other patients go on
            self.stats.error = (
                f"reading stopped after {self.stats.n_grid_tiles} of {tiler.cols * tiler.rows} tiles "
                f"({type(exc).__name__}: {exc})"
            )
            log.warning("slide %s: %s", self.slide, self.stats.error)
            yield SlideFailure(STATUS_SLIDE_UNREADABLE, f"{self.slide.name}: {self.stats.error}")
        finally:
            log.info("slide %s: %s", self.slide.name, self.stats.note())

    def read_tile(self, tile: TileRef) -> np.ndarray:
        """A tile of this slide at the native patch size (while its tiles are being iterated)."""
        assert self._tiler is not None, "tiles are read only while the slide's tiles are iterated"
        return self._tiler.read_tile(tile)

    def decoder(self, contract: Contract, qc: QualityControl | None = None) -> Callable[[Any], Decoded]:
        def decode(item: Any) -> Decoded:
            if isinstance(item, SlideFailure):
                return Decoded(item.status, item.message)
            try:
                rgb = self.read_tile(item)
            except Exception as exc:  # noqa: BLE001 - a corrupt tile is this row's status, the slide goes on
                return Decoded(
                    STATUS_UNREADABLE, f"tile could not be read: {exc}", width_px=item.size, height_px=item.size
                )
            return decode_rgb(rgb, contract, qc, width=item.size, height=item.size)

        return decode

    def describe(self, item: Any) -> tuple[str, int | None, int | None, int | None, tuple[int, int] | None]:
        if isinstance(item, SlideFailure):
            return self.slide.name, None, None, None, None
        return (
            f"{self.slide.name} [x={item.x},y={item.y},w={item.size},h={item.size}]",
            item.x,
            item.y,
            None,
            (item.size, item.size),
        )

    def input_key(self) -> str:
        """What --resume compares besides the tiles: the slide file and the tiling settings."""
        try:
            info = os.stat(self.slide)
            size, mtime = info.st_size, info.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        return f"{self.slide}\0{size}\0{mtime}\0{self.patch_mpp}\0{self.mpp_override}\0{self.min_tissue}"

    def finish(self) -> None:
        if self._tiler is not None:
            self._tiler.close()
            self._tiler = None


def slide_patients(
    paths: list[Path],
    contract: Contract,
    mpp_override: float | None,
    patch_mpp_override: float | None,
    min_tissue: float,
) -> list[SlidePatient]:
    """One patient per slide file; SlideError when the model's scale is unknown."""
    patch_mpp = patch_mpp_override if patch_mpp_override is not None else contract.patch_mpp
    if patch_mpp is None:
        raise SlideError(
            "the model's contract records no patch scale (patch_mpp: exported before contract schema 3): pass "
            "--patch-mpp, the microns per pixel of the patches it was trained on"
        )
    return [
        SlidePatient(
            slide_id_of(p),
            slide=p,
            patch_mpp=float(patch_mpp),
            native_px=contract.native_patch_px,
            mpp_override=mpp_override,
            min_tissue=min_tissue,
        )
        for p in paths
    ]
