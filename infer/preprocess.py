"""Decode one patch file into the model's input tensor, exactly as the contract says.

Every failure becomes a status code and a message, never an exception: one bad file must not
stop a run over a hundred thousand good ones.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2  # the package's __init__ has set OpenCV's decode limit (MAX_DECODE_PIXELS) before this import
import numpy as np

from . import MAX_DECODE_PIXELS
from .contract import Contract
from .quality import QualityControl
from .schema import (
    STATUS_CORRUPT,
    STATUS_EMPTY,
    STATUS_MISSING,
    STATUS_NOT_IMAGE,
    STATUS_OK,
    STATUS_OVERSIZED,
    STATUS_PENDING,
    STATUS_UNDERSIZED,
    STATUS_UNREADABLE,
    STATUS_UNSUPPORTED,
)

isal_zlib: Any  # ISA-L's zlib module (python-isal), or None
try:  # its inflate is 2.4x zlib's on the real patches (16 against 40 us each); the mosaic's PNGs use its deflate
    from isal import isal_zlib
except ImportError:  # pragma: no cover - a platform without its wheels: libpng inflates, as before
    isal_zlib = None

cv2.setNumThreads(1)  # decode runs in our own worker threads; nested cv2 threads only contend
try:  # a corrupt file is reported in its row; cv2's own warnings on stderr would only add noise
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
except AttributeError:
    pass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# magic numbers of the image formats cv2 decodes, to tell "corrupt image" from "not an image"
IMAGE_SIGNATURES = (PNG_SIGNATURE[:4], JPEG_SIGNATURE, b"II*\x00", b"MM\x00*", b"BM")
PNG_COLOUR_TYPE_PALETTE = 3


MAX_FILE_BYTES = 16 * 1024 * 1024  # a 50x50 patch is a few kB; anything this big is not a patch


@dataclass
class Decoded:
    """The outcome of decoding one file: a tensor when status is ok, else why not."""

    status: str
    message: str = ""
    tensor: np.ndarray | None = None  # float32; or 8-bit model pixels after finish_batch (see model_batch)
    width_px: int | None = None
    height_px: int | None = None
    rgb: np.ndarray | None = None  # the 8-bit RGB patch as read (before resizing), for review images
    colour: tuple[float, float, float] | None = None  # mean R, G, B on [0, 1] of a scored patch
    file_stat: tuple[int, int] | None = None  # (size, mtime_ns) of the file as read, for the resume fingerprint

    def ok_tensor(self) -> np.ndarray:
        """The model input of a patch decoded ok and not yet scored (every such patch has one): float32, or 8-bit
        model pixels where finish_batch left them (model_batch makes a float32 batch of either)."""
        assert self.tensor is not None, f"a {self.status} patch has no tensor"
        return self.tensor

    def ok_rgb(self) -> np.ndarray:
        """The pixels of a patch decoded ok or left pending (every such patch carries them until it is written)."""
        assert self.rgb is not None, f"a {self.status} patch has no pixels"
        return self.rgb


def patch_mean_colour(rgb: np.ndarray) -> tuple[float, float, float]:
    """Mean R, G, B of an 8-bit patch on [0, 1]: what the colour statistics of patients are made of."""
    r, g, b, _ = cv2.mean(rgb)  # in C: 10x numpy's mean over an axis of a 50x50x3 patch
    return r / 255.0, g / 255.0, b / 255.0


def patch_mean_colours(stack: np.ndarray) -> list[tuple[float, float, float]]:
    """patch_mean_colour of each patch of an 8-bit NHWC RGB stack, the same floats: each channel's exact integer
    sum, times 1 / pixels as cv2.mean computes its mean, then / 255 (three calls for the stack, not one a patch)."""
    n, height, width = stack.shape[:3]
    if n == 0:
        return []
    planes = cv2.split(np.ascontiguousarray(stack).reshape(n * height, width, 3))
    sums = [cv2.reduce(p.reshape(n, height * width), 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S)[:, 0] for p in planes]
    scale = 1.0 / (height * width)
    r, g, b = ((s.astype(np.float64) * scale / 255.0).tolist() for s in sums)
    return list(zip(r, g, b))


def file_stat_of(path) -> tuple[int, int]:
    """(size, mtime_ns) of a path, (-1, -1) when it cannot be stat'ed."""
    try:
        info = os.stat(path)
        return info.st_size, info.st_mtime_ns
    except (OSError, ValueError):
        return -1, -1


def _read_bytes(path: Path) -> tuple[bytes | None, Decoded | None, tuple[int, int] | None]:
    """(the file's bytes, or why not; its (size, mtime_ns) as opened)."""
    try:
        # non-blocking open: a FIFO named *.png would otherwise wait forever for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            info = os.fstat(fd)
            file_stat = (info.st_size, info.st_mtime_ns)
            if stat.S_ISDIR(info.st_mode):
                return None, Decoded(STATUS_NOT_IMAGE, "is a directory"), file_stat
            if not stat.S_ISREG(info.st_mode):
                return (
                    None,
                    Decoded(STATUS_NOT_IMAGE, "not a regular file (a FIFO, socket or device): not read"),
                    file_stat,
                )
            # the file's own size (+1 to see growth), capped one byte past the limit: a multi-GB file must not
            # land in memory, and reading the limit itself would allocate 16 MB for every 2 KB patch
            want = min(info.st_size, MAX_FILE_BYTES) + 1
            data = os.read(fd, want)  # one read for a local file: all its bytes (or one more, if it grew)
            if len(data) < min(info.st_size, want):  # a network file system may return less: read on to the end
                parts = [data]
                while parts[-1] and sum(map(len, parts)) < want:
                    parts.append(os.read(fd, want - sum(map(len, parts))))
                data = b"".join(parts)
            return data, None, file_stat
        finally:
            os.close(fd)
    except ValueError as exc:  # a NUL byte or an unencodable character in a --from-list line
        return None, Decoded(STATUS_UNREADABLE, f"path cannot be opened: {exc}"), None
    except FileNotFoundError:
        return None, Decoded(STATUS_MISSING, "file vanished before it could be read"), None
    except PermissionError:
        return None, Decoded(STATUS_UNREADABLE, "permission denied"), file_stat_of(path)
    except IsADirectoryError:
        return None, Decoded(STATUS_NOT_IMAGE, "is a directory"), file_stat_of(path)
    except OSError as exc:
        return None, Decoded(STATUS_UNREADABLE, f"read error: {exc.strerror or exc}"), file_stat_of(path)


def _to_rgb8(image: np.ndarray, notes: list[str]) -> np.ndarray | None:
    """Bring any decoded image to 8-bit, 3-channel RGB, noting each conversion."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
        notes.append("16-bit converted to 8-bit")
    elif image.dtype != np.uint8:
        return None
    if image.ndim == 2:
        notes.append("grayscale converted to RGB")
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        notes.append("grayscale converted to RGB")
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 4:
        notes.append("alpha channel dropped")
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return None


def refused_size(width: int, height: int, contract: Contract) -> Decoded | None:
    """The row of a patch the contract refuses for its size, None when it is scored: the one rule the decoder
    applies (from the header where it can, and to the decoded pixels) and training's size filter too. Larger
    than a patch in either side is oversized even when the other side is short (60x40), whatever the format."""
    native = contract.native_patch_px
    if (height > native or width > native) and contract.oversized_policy == "refuse":
        return _too_large(width, height, contract)
    if (height < native or width < native) and contract.undersized_policy == "refuse":
        return Decoded(
            STATUS_UNDERSIZED,
            f"{width}x{height} px is smaller than {native}x{native}",
            width_px=width,
            height_px=height,
        )
    return None


def _fit_size(rgb: np.ndarray, contract: Contract, notes: list[str]) -> tuple[np.ndarray | None, Decoded | None]:
    height, width = rgb.shape[:2]
    refused = refused_size(width, height, contract)
    if refused is not None:
        return None, refused
    native = contract.native_patch_px
    if height < native or width < native:
        if contract.undersized_policy == "pad":
            rgb = cv2.copyMakeBorder(
                rgb, 0, max(0, native - height), 0, max(0, native - width), cv2.BORDER_CONSTANT, value=(0, 0, 0)
            )
            notes.append(f"undersized {width}x{height} px, zero-padded")
        else:
            notes.append(f"undersized {width}x{height} px, stretched")
    elif height > native or width > native:
        notes.append(f"oversized {width}x{height} px, resized")
    return rgb, None


@functools.lru_cache(maxsize=256)
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows (or columns) of a nearest-neighbour resize with half-pixel centres, in integers.

    src = floor((dst + 0.5) * in / out), computed as ((2 dst + 1) in) // (2 out) so no float
    rounding enters: cv2 INTER_NEAREST_EXACT and TF's nearest resize agree on 50 -> 48 but not on
    every undersized edge patch (32x42 differed). idc_train.pipeline.decode_resized uses the same
    integer formula, so training and inference see the same pixels on every size.
    """
    dst = np.arange(out_size, dtype=np.int64)
    indices = ((2 * dst + 1) * in_size) // (2 * out_size)
    indices.flags.writeable = False  # cached: shared by every call
    return indices


@functools.lru_cache(maxsize=256)
def _nearest_flat_indices(in_h: int, in_w: int, channels: int, height: int, width: int) -> np.ndarray:
    """nearest_indices' rows and columns as positions in one image's flattened HWC pixels."""
    rows, cols = nearest_indices(in_h, height), nearest_indices(in_w, width)
    flat = (rows[:, None, None] * in_w + cols[None, :, None]) * channels + np.arange(channels)[None, None, :]
    flat = flat.ravel()
    flat.flags.writeable = False  # cached: shared by every call
    return flat


def resize_nearest(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an HWC image (or an NHWC stack) to height x width (the contract's 'nearest')."""
    # one take of cached flat indices: 2x faster than a take of rows then one of columns (20x faster than fancy
    # indexing with fresh index arrays), the same pixels
    in_h, in_w, channels = rgb.shape[-3:]
    flat = _nearest_flat_indices(in_h, in_w, channels, height, width)
    lead = rgb.shape[:-3]
    return rgb.reshape(*lead, in_h * in_w * channels).take(flat, axis=-1).reshape(*lead, height, width, channels)


def model_pixels(rgb: np.ndarray, contract: Contract) -> np.ndarray:
    """An 8-bit RGB image (HWC, or a stack of them, NHWC) resized and in the model's channel order, still 8-bit:
    the model's input before scaling (scale_pixels)."""
    size = (contract.input_height_px, contract.input_width_px)
    if rgb.shape[-3:-1] != size:
        rgb = resize_nearest(rgb, *size)
    if contract.channel_order == "BGR":
        rgb = rgb[..., ::-1]
    return rgb


def scale_pixels(pixels: np.ndarray, contract: Contract) -> np.ndarray:
    """8-bit model pixels (model_pixels) to the model's float32 input: pixel * scale + offset, in float32."""
    # x * s + o in float32 as before (the pixels cast to float32, times the scale, plus the offset), one pass
    # fewer: the cast and the product in one call; + 0 is left out when the scale's sign is + (then no product
    # is -0.0, which + 0 would turn into +0.0; a scale of -0.0 has the sign -)
    tensor = np.multiply(pixels, np.float32(contract.scale), dtype=np.float32)
    if contract.offset != 0 or math.copysign(1.0, contract.scale) < 0:
        tensor += np.float32(contract.offset)
    return tensor


def preprocess_rgb(rgb: np.ndarray, contract: Contract) -> np.ndarray:
    """Resize and scale an 8-bit RGB image (HWC, or a stack of them, NHWC) to the model's input (float32)."""
    return scale_pixels(model_pixels(rgb, contract), contract)


def model_batch(tensors: list[np.ndarray], contract: Contract) -> np.ndarray:
    """The float32 NHWC batch of patches' model inputs: float32 tensors as they are, 8-bit model pixels (what
    finish_batch leaves) scaled here, a model batch at a time: a task's patches then wait as 8-bit pixels, a
    quarter of the memory the float32 tensors took, which kept the caches the model runs in busy."""
    if all(tensor.dtype == np.uint8 for tensor in tensors):
        return scale_pixels(np.stack(tensors), contract)
    return np.stack([scale_pixels(t, contract) if t.dtype == np.uint8 else t for t in tensors])


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, without decoding the pixels."""
    if len(data) >= 24 and data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


# ancillary PNG chunks that change what cv2 decodes (transparency); every other ancillary chunk (text, time,
# ICC profile, gamma, physical size...) is ignored by cv2's decoder but is what libpng warns about
_PNG_KEPT_ANCILLARY = frozenset({b"tRNS"})
_PNG_CHUNK_HEAD = struct.Struct(">I4s")
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the only IEND there is: no data, a fixed checksum


def png_without_ancillary(data: bytes) -> tuple[bytes, list[str]]:
    """The PNG with only the chunks cv2's decode depends on (critical ones and tRNS), and notes on what was
    wrong in those dropped. libpng prints warnings about ancillary chunks (a bad CRC, a malformed ICC
    profile or text) straight to the process's stderr, where no file is named and -q cannot silence them;
    cv2 ignores those chunks anyway, so the pixels are the same (checked on every idc-real patch) and the
    row's message names the problem instead. Anything that is not a well-formed chunk list is returned
    unchanged, for the decoder to judge."""
    data, notes, _ = _filter_png(data)
    return data, notes


def _filter_png(data: bytes) -> tuple[bytes, list[str], bool]:
    """png_without_ancillary's PNG and notes, and whether it is a plain 8-bit RGB PNG (every idc-real patch):
    a well-formed chunk list up to IEND, 8-bit truecolour, no tRNS colour key (an alpha channel to
    IMREAD_UNCHANGED, noted as dropped), not animated. cv2 decodes such a file to the same pixels with
    IMREAD_COLOR_RGB as with IMREAD_UNCHANGED and a BGR-to-RGB conversion (checked on all 35,336 idc-real
    patches), without the conversion's call and its pass over the pixels."""
    if not data.startswith(PNG_SIGNATURE):
        return data, [], False
    kept = [data[:8]]
    notes: list[str] = []
    offset, end, dropped = 8, len(data), False
    seen_ihdr = seen_idat = dropped_after_idat = keyed = complete = False
    rgb8 = False
    head, crc32 = _PNG_CHUNK_HEAD.unpack_from, zlib.crc32  # this runs for every patch: locals, few calls
    while offset + 12 <= end:
        length, kind = head(data, offset)
        chunk_end = offset + 12 + length
        if chunk_end > end or not kind.isalpha() or kind == b"acTL":
            # truncated, not a chunk, or an animated PNG (cv2 decodes its first frame, not the default image
            # its IDAT holds, and needs the animation chunks for that): left to the decoder as it is
            return data, [], False
        if kind[0] & 0x20:  # ancillary (bit 5 of the first byte): libpng may skip it, and warns instead
            if not seen_ihdr:
                return data, [], False  # a chunk before IHDR makes the file corrupt: the decoder must see it
            bad_crc = crc32(data[offset + 4 : chunk_end - 4]) != int.from_bytes(data[chunk_end - 4 : chunk_end], "big")
            if bad_crc:
                notes.append(f"PNG {kind.decode('ascii')} chunk has a bad checksum: ignored")
            if bad_crc or kind not in _PNG_KEPT_ANCILLARY:
                offset, dropped = chunk_end, True
                dropped_after_idat |= seen_idat
                continue
            keyed = True  # the one ancillary chunk kept: tRNS
        elif kind == b"IDAT":
            if dropped_after_idat:
                return data, [], False  # a chunk between two IDATs breaks the image data: the decoder must see it
            if not seen_idat and chunk_end == end - 12 and data.endswith(_PNG_IEND):
                kept.append(data[offset:])  # one IDAT, then IEND: the usual end of a patch, taken whole
                complete = True
                break
            seen_idat = True
        elif kind == b"IHDR":
            seen_ihdr = True
            rgb8 = length == 13 and data[offset + 16] == _PNG_BIT_DEPTH_8 and data[offset + 17] == _PNG_COLOUR_TYPE_RGB
        kept.append(data[offset:chunk_end])
        offset = chunk_end
        if kind == b"IEND":
            complete = True
            break
    plain_rgb = _IMREAD_COLOR_RGB is not None and complete and rgb8 and not keyed
    return (b"".join(kept) if dropped else data), notes, plain_rgb


# OpenCV >= 4.10 decodes straight to RGB order; older ones decode as stored and are converted (_to_rgb8)
_IMREAD_COLOR_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_PNG_BIT_DEPTH_8, _PNG_COLOUR_TYPE_RGB = 8, 2
# whether decode_bytes inflates a plain PNG's image data itself (_with_stored_idat): off by default. Each ISA-L
# call lets go of Python's lock, and worker threads that share it lose more in handing it over than the 17 us a
# patch saves (the threaded engine measured 5% slower with it); a process that decodes in one thread (the
# worker processes of processes.py) turns it on and gains them.
_inflate_here = False


def inflate_png_here(on: bool = True) -> None:
    """Turn _with_stored_idat on (or off) in this process: only for one that decodes in a single thread."""
    global _inflate_here
    _inflate_here = on and isal_zlib is not None


_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 kB window, no preset dictionary
_PNG_PLAIN_IHDR_TAIL = b"\x00\x00\x00"  # compression 0, filter method 0, not interlaced


# zlib's, binascii's and ISA-L's checksums let go of Python's lock for buffers over 5 kB, and getting it back costs
# more than the 0.2 us the checksum of 4 kB takes while the other workers want it: summed in pieces that keep it
_CHECKSUM_PIECE = 4096


def _checksum(function, buffer, value: int) -> int:
    view = memoryview(buffer)
    for start in range(0, len(view), _CHECKSUM_PIECE):
        value = function(view[start : start + _CHECKSUM_PIECE], value)
    return value


def _with_stored_idat(data: bytes) -> bytes | None:
    """The same PNG with its image data inflated here by ISA-L and stored uncompressed, for libpng to unfilter:
    a plain 8-bit RGB PNG as _filter_png leaves it (IHDR, its IDATs, IEND) decodes in 41 us instead of 68 (zlib's
    inflate was 40 of them). libpng unfilters the very bytes it would have inflated itself, so the pixels are
    the same (tested; checked on every idc-real patch). None (decode the file as it is) when ISA-L is missing or
    anything differs from a well-formed file: another chunk, an IDAT's CRC, a stream that fails, ends early,
    runs long or carries data after its end, or one whose header libpng would judge otherwise. Those files keep
    libpng's own verdict, warnings and errors.

    The zlib header's window: libpng inflates a row at a time and refuses a back-reference beyond the window
    the header declares (writers declare small ones for small images: 8 kB for 35,220 of the idc-real patches),
    where ISA-L accepts any distance into what it has written. A stream whose image data fits in its declared
    window cannot reach beyond it, so only those are inflated here (at most 32 kB of image data: a patch, not a
    tile); the others, and a preset dictionary or a window over 32 kB, go to libpng."""
    if isal_zlib is None or data[12:16] != b"IHDR" or data[26:29] != _PNG_PLAIN_IHDR_TAIL:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    expected = height * (1 + 3 * width)  # a filter byte, then 3 bytes a pixel, each row
    view, crc32 = memoryview(data), functools.partial(_checksum, isal_zlib.crc32)
    head = _PNG_CHUNK_HEAD.unpack_from
    offset, end, bodies = 33, len(data), []
    while offset + 12 <= end:
        length, kind = head(data, offset)
        if kind != b"IDAT":
            break
        chunk_end = offset + 12 + length
        if chunk_end > end:
            return None
        if crc32(view[offset + 4 : chunk_end - 4], 0) != int.from_bytes(view[chunk_end - 4 : chunk_end], "big"):
            return None
        bodies.append(view[offset + 8 : chunk_end - 4])
        offset = chunk_end
    if not bodies or view[offset:] != _PNG_IEND:
        return None
    stream = bodies[0] if len(bodies) == 1 else b"".join(bodies)
    if len(stream) < 2:
        return None
    method, window_bits, preset = stream[0] & 0x0F, (stream[0] >> 4) + 8, stream[1] & 0x20
    if method != 8 or window_bits > 15 or preset or expected > 1 << window_bits:
        return None
    inflater = isal_zlib.decompressobj()
    try:
        raw = inflater.decompress(stream, expected + 1)
    except Exception:  # noqa: BLE001 - isal_zlib.error on any bad stream: libpng then judges the file
        return None
    if len(raw) != expected or not inflater.eof or inflater.unused_data:
        return None
    # one stored block (the image data is at most 32 kB here, a block holds 65,535 bytes)
    blocks = (_ZLIB_HEADER, struct.pack("<BHH", 1, expected, expected ^ 0xFFFF), raw)
    adler = _checksum(isal_zlib.adler32, raw, 1).to_bytes(4, "big")
    checksum = crc32(b"IDAT", 0)
    for block in (*blocks, adler):
        checksum = crc32(block, checksum)
    length = (len(_ZLIB_HEADER) + 5 + expected + 4).to_bytes(4, "big")
    return b"".join((data[:33], length, b"IDAT", *blocks, adler, checksum.to_bytes(4, "big"), _PNG_IEND))


def _is_sof(marker: int) -> bool:
    # SOF0-SOF15 carry the frame size; C4 (DHT), C8 (reserved) and CC (DAC) share the range but do not
    return 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)


_JPEG_FILL = re.compile(rb"\xff+")
# real files reach their frame header within a few dozen segments; a crafted one of millions of
# tiny segments is left to cv2 (and its decode limit) rather than walked in Python
_MAX_JPEG_SEGMENTS = 10_000


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (SOFn segment), without decoding the pixels."""
    if not data.startswith(JPEG_SIGNATURE):
        return None
    pos, segments = 2, 0
    while pos + 4 <= len(data) and segments < _MAX_JPEG_SEGMENTS:
        segments += 1
        if data[pos] != 0xFF:
            return None  # not at a marker: a corrupt stream, for cv2 to report
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes before a marker: skip the whole run at C speed
            fill = _JPEG_FILL.match(data, pos)
            assert fill is not None  # data[pos] is 0xFF: the pattern matches there
            pos = fill.end() - 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers have no length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if _is_sof(marker):
            if pos + 9 > len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (width, height) if height else None  # height 0: defined later by a DNL segment
        if length < 2:
            return None
        pos += 2 + length  # APPn (EXIF thumbnails with their own SOF included) skipped whole
    return None


def bmp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a BMP's info header (height may be negative: a top-down bitmap)."""
    if len(data) < 26 or data[:2] != b"BM":
        return None
    header_bytes = int.from_bytes(data[14:18], "little")
    # the DIB header sizes BMP writers use: a text file starting "BM" is not a bitmap
    if header_bytes in (12, 16, 40, 52, 56, 64, 108, 124):
        if header_bytes == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = int.from_bytes(data[22:26], "little", signed=True)
        return abs(width), abs(height)
    return None


def tiff_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a TIFF's first image (ImageWidth 256 / ImageLength 257 of the first IFD)."""
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    offset = int.from_bytes(data[4:8], order)
    if offset + 2 > len(data):
        return None
    count = int.from_bytes(data[offset : offset + 2], order)
    sizes = {}
    for i in range(min(count, 4096)):
        entry = offset + 2 + 12 * i
        if entry + 12 > len(data):
            break
        tag, kind = int.from_bytes(data[entry : entry + 2], order), int.from_bytes(data[entry + 2 : entry + 4], order)
        if tag in (256, 257):
            width = 2 if kind == 3 else 4  # SHORT or LONG
            sizes[tag] = int.from_bytes(data[entry + 8 : entry + 8 + width], order)
    return (sizes[256], sizes[257]) if 256 in sizes and 257 in sizes else None


def webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP's VP8 / VP8L / VP8X chunk header."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG, BMP, TIFF or WebP header without decoding the pixels;
    None for other formats or unreadable headers (cv2's decode limit still applies to those)."""
    return png_size(data) or jpeg_size(data) or bmp_size(data) or tiff_size(data) or webp_size(data)


def _source_notes(data: bytes) -> list[str]:
    """Notes on what the file was before conversion, that the decoded pixels no longer tell."""
    if data.startswith(JPEG_SIGNATURE):
        return ["lossy JPEG source"]
    if png_size(data) and len(data) > 25 and data[25] == PNG_COLOUR_TYPE_PALETTE:
        return ["palette converted to RGB"]
    return []


def _too_large(width: int, height: int, contract: Contract) -> Decoded:
    native = contract.native_patch_px
    return Decoded(
        STATUS_OVERSIZED, f"{width}x{height} px is larger than {native}x{native}", width_px=width, height_px=height
    )


def decode_bytes(
    data: bytes, contract: Contract, qc: QualityControl | None = None, resample: str | None = None, defer: bool = False
) -> Decoded:
    """Decode the bytes of one image file into the model's input tensor."""
    if not data:
        return Decoded(STATUS_EMPTY, "zero-byte file")
    size = header_size(data)
    if size is not None:
        # refused from the header: a slide overview saved among patches must not be decoded (GBs)
        width, height = size
        if contract.oversized_policy == "refuse" and max(size) > contract.native_patch_px and resample is None:
            return _too_large(width, height, contract)
        if width * height > MAX_DECODE_PIXELS:
            refused = _too_large(width, height, contract)
            refused.message += f", beyond the {MAX_DECODE_PIXELS / 1e6:.0f} Mpx any patch could need"
            return refused
    if len(data) > MAX_FILE_BYTES:
        return Decoded(STATUS_OVERSIZED, f"file over {MAX_FILE_BYTES // 2**20} MiB is far too large for a patch")
    data, chunk_notes, as_rgb = _filter_png(data)
    if as_rgb and _inflate_here:
        data = _with_stored_idat(data) or data
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(
            buffer, _IMREAD_COLOR_RGB if as_rgb and _IMREAD_COLOR_RGB is not None else cv2.IMREAD_UNCHANGED
        )
    except cv2.error as exc:  # cv2 raises on some malformed headers instead of returning None
        if "CV_IO_MAX_IMAGE" in str(exc):  # refused by OPENCV_IO_MAX_IMAGE_PIXELS (or _WIDTH/_HEIGHT)
            return Decoded(
                STATUS_OVERSIZED,
                "image dimensions beyond the decode limit (OPENCV_IO_MAX_IMAGE_PIXELS): far too large for a patch",
            )
        image = None
        detail = str(exc).strip().splitlines()[-1][:120]
    else:
        detail = ""
    if image is None:
        if data.startswith(IMAGE_SIGNATURES):
            return Decoded(STATUS_CORRUPT, ("image data is truncated or corrupt " + detail).strip())
        return Decoded(STATUS_NOT_IMAGE, "content is not an image")
    height, width = image.shape[:2]
    notes = _source_notes(data) + chunk_notes
    rgb = image if as_rgb else _to_rgb8(image, notes)
    if rgb is None:
        return Decoded(
            STATUS_UNSUPPORTED,
            f"pixel type {image.dtype} with shape {image.shape} not supported",
            width_px=width,
            height_px=height,
        )
    if resample is not None:  # a tile of another scale (a QuPath export): brought to the contract's first
        rgb = resample_to_native(rgb, contract, notes, resample)
    elif defer and rgb.shape[0] == rgb.shape[1] == contract.native_patch_px:
        # a full-size patch: quality control, resize and scaling are done for the whole batch (finish_batch)
        return Decoded(STATUS_PENDING, "; ".join(notes), width_px=width, height_px=height, rgb=rgb)
    return decode_rgb(rgb, contract, qc, notes, width, height)


def finish_batch(decoded: list[Decoded], contract: Contract, qc: QualityControl | None = None) -> None:
    """Finish the full-size patches ``decode_file(..., defer=True)`` left pending, all at once: the same
    statuses, messages and tensors as decode_rgb gives one by one, in a few array operations per batch
    instead of several per patch (they hold Python's lock, which the worker threads share)."""
    pending = [i for i, d in enumerate(decoded) if d.status == STATUS_PENDING]
    if not pending:
        return
    pixels = np.stack([decoded[i].ok_rgb() for i in pending])
    keep = np.ones(len(pending), dtype=bool)
    if qc is not None:
        for j, flagged in enumerate(qc.check_batch(pixels)):
            if flagged is not None:
                d = decoded[pending[j]]
                d.status, d.message = flagged[0], "; ".join(filter(None, [d.message, flagged[1]]))
                keep[j] = False
    kept = [i for j, i in enumerate(pending) if keep[j]]
    if not kept:
        return
    if len(kept) < len(pending):
        pixels = pixels[keep]
    # 8-bit, resized: model_batch scales them (the same arithmetic as preprocess_rgb) right before the model runs
    small = model_pixels(pixels, contract)
    for j, (i, colour) in enumerate(zip(kept, patch_mean_colours(pixels))):
        d = decoded[i]
        d.status, d.tensor, d.colour = STATUS_OK, small[j], colour


def resample_to_native(rgb: np.ndarray, contract: Contract, notes: list[str], why: str) -> np.ndarray:
    """Area-resize an image so its longer side is the contract's native patch size (the shorter keeps the
    aspect; an edge tile then goes through the undersized policy like any short patch)."""
    native = contract.native_patch_px
    height, width = rgb.shape[:2]
    factor = native / max(height, width)
    if factor == 1:
        return rgb
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    notes.append(f"{why}: {width}x{height} px resampled to {size[0]}x{size[1]}")
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def decode_rgb(
    rgb: np.ndarray,
    contract: Contract,
    qc: QualityControl | None = None,
    notes: list[str] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> Decoded:
    """An 8-bit RGB patch (decoded from a file or read from a slide) to the model's input, after the
    quality check; ``width``/``height`` are what the row reports (the file's own size by default)."""
    notes = [] if notes is None else notes
    if width is None or height is None:
        height, width = rgb.shape[:2]
    original = rgb
    if qc is not None:
        flagged = qc.check(rgb)
        if flagged is not None:
            return Decoded(flagged[0], "; ".join([*notes, flagged[1]]), width_px=width, height_px=height, rgb=original)
    fitted, refused = _fit_size(rgb, contract, notes)
    if refused is not None:
        refused.width_px, refused.height_px = width, height
        return refused
    assert fitted is not None  # _fit_size gives pixels or why not
    return Decoded(
        STATUS_OK,
        "; ".join(notes),
        preprocess_rgb(fitted, contract),
        width,
        height,
        original,
        colour=patch_mean_colour(original),
    )


def decode_file(
    path: Path, contract: Contract, qc: QualityControl | None = None, resample: str | None = None, defer: bool = False
) -> Decoded:
    """Read and decode one patch file; never raises for a bad file. ``qc``: the quality check (none by
    default); ``resample``: why the image is brought to the native patch size first (a tile export);
    ``defer``: leave a full-size patch pending for finish_batch."""
    data, failure, file_stat = _read_bytes(path)
    if failure is not None:
        decoded = failure
    else:
        assert data is not None  # _read_bytes gives the bytes or why not
        decoded = decode_bytes(data, contract, qc, resample, defer)
    decoded.file_stat = file_stat
    return decoded
