import os
import struct
import subprocess
import sys
import textwrap
import zlib

import cv2
import numpy as np
import pytest

from idc_infer.contract import Contract
from idc_infer.preprocess import decode_file, preprocess_rgb
from idc_infer.schema import STATUS_CORRUPT
from idc_train.synthetic import write_faulty_files

CONTRACT = Contract()


@pytest.fixture()
def faulty_dir(tmp_path):
    expected = write_faulty_files(tmp_path / "p1")
    return tmp_path / "p1", expected


def test_every_bad_kind_gets_its_status(faulty_dir):
    directory, expected = faulty_dir
    for name, status in expected.items():
        decoded = decode_file(directory / name, CONTRACT)
        assert decoded.status == status, name
        if status == "ok":
            assert decoded.tensor.shape == (48, 48, 3) and decoded.tensor.dtype == np.float32
            assert 0.0 <= decoded.tensor.min() <= decoded.tensor.max() <= 1.0
        else:
            assert decoded.tensor is None and decoded.message


def test_conversions_are_noted(faulty_dir):
    directory, _ = faulty_dir
    assert "grayscale" in decode_file(directory / "gray.png", CONTRACT).message
    assert "alpha" in decode_file(directory / "rgba.png", CONTRACT).message
    assert "16-bit" in decode_file(directory / "deep16.png", CONTRACT).message
    assert "undersized 31x50" in decode_file(directory / "edge.png", CONTRACT).message
    assert "palette" in decode_file(directory / "palette.png", CONTRACT).message
    assert "JPEG" in decode_file(directory / "photo.jpg", CONTRACT).message
    assert decode_file(directory / "=HYPERLINK(1).png", CONTRACT).message == ""  # nothing converted, no note


def test_sixteen_bit_and_rgba_give_the_same_tensor_as_the_8bit_original(faulty_dir):
    directory, _ = faulty_dir
    base = decode_file(directory / "=HYPERLINK(1).png", CONTRACT).tensor
    np.testing.assert_array_equal(decode_file(directory / "rgba.png", CONTRACT).tensor, base)
    np.testing.assert_array_equal(decode_file(directory / "deep16.png", CONTRACT).tensor, base)


def test_vanished_file_is_missing(tmp_path):
    assert decode_file(tmp_path / "gone.png", CONTRACT).status == "missing"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file; needs an ordinary user")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(b"\x89PNG....")
    path.chmod(0)
    assert decode_file(path, CONTRACT).status == "unreadable"


def test_undersized_policy_refuse(faulty_dir):
    directory, _ = faulty_dir
    decoded = decode_file(directory / "edge.png", CONTRACT.replace(undersized_policy="refuse"))
    assert decoded.status == "undersized_refused"


def test_channel_order_and_scaling():
    rgb = np.zeros((50, 50, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    tensor = preprocess_rgb(rgb, CONTRACT)
    assert tensor.shape == (48, 48, 3)
    assert tensor[..., 0].min() == pytest.approx(1.0) and tensor[..., 2].max() == 0.0


def test_bgr_file_is_read_as_rgb(tmp_path):
    rgb = np.zeros((50, 50, 3), np.uint8)
    rgb[..., 0] = 200
    cv2.imwrite(str(tmp_path / "r.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    tensor = decode_file(tmp_path / "r.png", CONTRACT).tensor
    assert tensor[..., 0].mean() == pytest.approx(200 / 255) and tensor[..., 2].mean() == 0.0


def test_oversized_png_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    big = np.zeros((3000, 4000, 3), np.uint8)
    path = tmp_path / "overview.png"
    path.write_bytes(cv2.imencode(".png", big)[1].tobytes())

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded a file the header already refuses")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    decoded = decode_file(path, CONTRACT)
    assert decoded.status == "oversized_refused" and (decoded.width_px, decoded.height_px) == (4000, 3000)


def test_permission_error_is_reported_in_the_row(tmp_path, monkeypatch):

    path = tmp_path / "locked.png"
    path.write_bytes(b"x")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)  # what decode_file opens files with (non-blocking)
    decoded = decode_file(path, CONTRACT)
    assert decoded.status == "unreadable" and "permission" in decoded.message


def jpeg_claiming(width_px: int, height_px: int, thumbnail: bool = False) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims another size; optionally an EXIF-like APP1
    segment first, holding a thumbnail frame header of its own that must not be taken for the image's."""
    data = bytearray(cv2.imencode(".jpg", np.full((50, 50, 3), 128, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height_px, width_px)
    if thumbnail:
        body = b"Exif\x00\x00" + b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 16, 16) + bytes(12)
        data[2:2] = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    return bytes(data)


def refuse_to_decode(monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded a file the header already refuses")

    monkeypatch.setattr(cv2, "imdecode", no_decode)


@pytest.mark.parametrize("thumbnail", [False, True])
def test_oversized_jpeg_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch, thumbnail):
    path = tmp_path / "overview.jpg"
    path.write_bytes(jpeg_claiming(30000, 20000, thumbnail))
    refuse_to_decode(monkeypatch)
    decoded = decode_file(path, CONTRACT)
    assert decoded.status == "oversized_refused" and "30000x20000 px is larger than 50x50" in decoded.message
    assert (decoded.width_px, decoded.height_px) == (30000, 20000)


def test_jpeg_beyond_the_decode_limit_is_refused_even_where_oversized_patches_are_resized(tmp_path, monkeypatch):
    path = tmp_path / "overview.jpg"
    path.write_bytes(jpeg_claiming(30000, 30000))
    refuse_to_decode(monkeypatch)
    decoded = decode_file(path, CONTRACT.replace(oversized_policy="resize"))
    assert decoded.status == "oversized_refused" and "30000x30000" in decoded.message


def test_jpeg_header_size_matches_the_decoded_size(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(cv2.imencode(".jpg", np.zeros((60, 70, 3), np.uint8))[1].tobytes())
    decoded = decode_file(path, CONTRACT)
    assert decoded.status == "oversized_refused" and (decoded.width_px, decoded.height_px) == (70, 60)
    assert decode_file(path, CONTRACT.replace(oversized_policy="resize")).status == "ok"


def test_jpeg_header_walk_skips_a_fill_run_in_one_step(monkeypatch):
    """Fill bytes (0xFF) may precede any marker; a file made of millions of them must not be walked
    byte by byte (seconds per file): the run counts as one step of the bounded walk."""
    from idc_infer import preprocess

    monkeypatch.setattr(preprocess, "_MAX_JPEG_SEGMENTS", 50)
    real = cv2.imencode(".jpg", np.zeros((60, 70, 3), np.uint8))[1].tobytes()
    padded = real[:2] + b"\xff" * 15_000_000 + real[2:]  # SOI, a 15 MB run of fill, then the real segments
    assert preprocess.jpeg_size(padded) == (70, 60)


def bmp_claiming(width_px: int, height_px: int) -> bytes:
    """A 24-bit BMP header claiming a huge image, followed by a few bytes of pixels: a few dozen bytes on disk."""
    info = struct.pack("<IiiHHIIiiII", 40, width_px, height_px, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + bytes(16)


def test_a_huge_bmp_is_refused_from_its_header(tmp_path):
    path = tmp_path / "slide.bmp"
    path.write_bytes(bmp_claiming(10000, 10000))
    decoded = decode_file(path, Contract(oversized_policy="resize"))
    assert decoded.status == "oversized_refused" and "Mpx any patch could need" in decoded.message


def test_decode_limit_refusal_is_reported_in_the_row(tmp_path):
    """A format whose header is not read here (PPM) claiming 10000x10000 px: cv2's decode limit refuses it.

    Run in a fresh interpreter: OpenCV reads its limit once, when cv2 is first imported."""
    path = tmp_path / "slide.png"
    path.write_bytes(b"P6\n10000 10000\n255\n" + b"\0" * 300)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from idc_infer.contract import Contract
        from idc_infer.preprocess import decode_file
        decoded = decode_file(Path({str(path)!r}), Contract(oversized_policy="resize"))
        print(decoded.status)
        print(decoded.message)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_IO_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    status, message = result.stdout.splitlines()[:2]
    assert status == "oversized_refused" and "decode limit" in message


def test_path_with_a_nul_byte_is_unreadable_not_a_crash(tmp_path):
    decoded = decode_file(tmp_path / "a.png\0b.png", CONTRACT)
    assert decoded.status == "unreadable" and "null byte" in decoded.message


def test_huge_file_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "disk.png"
    with path.open("wb") as handle:
        handle.truncate(256 * 1024**2)  # sparse: long, yet nothing on disk
    decoded = decode_file(path, CONTRACT)
    assert decoded.status == "oversized_refused" and "16 MiB" in decoded.message  # the limit as it is: 16 MiB


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_a_fifo_named_png_gets_a_row_and_does_not_hang(tmp_path):
    """Opening a FIFO blocks until a writer comes: it must be refused from its file type, at once."""
    fifo = tmp_path / "8863_idx5_x1_y1_class0.png"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from idc_infer.contract import Contract
        from idc_infer.preprocess import decode_file
        d = decode_file(Path({str(fifo)!r}), Contract())
        print(d.status, d.message)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("not_an_image") and "not a regular file" in done.stdout


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff", ".webp"])
def test_a_60x40_image_is_oversized_in_every_format_and_read_from_its_header(ext, tmp_path):
    """60 px wide is larger than a 50 px patch even when 40 px high: refused as PNG was, never stretched;
    and the size comes from the header, before any pixel is decoded."""
    from idc_infer.preprocess import header_size

    ok, data = cv2.imencode(ext, np.full((40, 60, 3), 128, np.uint8))
    if not ok:
        pytest.skip(f"this OpenCV cannot write {ext}")
    assert header_size(data.tobytes()) == (60, 40)
    path = tmp_path / f"p{ext}"
    path.write_bytes(data.tobytes())
    decoded = decode_file(path, CONTRACT)
    assert decoded.status == "oversized_refused" and "60x40" in decoded.message


def test_a_text_file_starting_with_bm_is_not_taken_for_a_bitmap(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"BM: meeting notes about the slides, nothing like a bitmap header at all\n" * 3)
    decoded = decode_file(path, CONTRACT)  # "BM" is the bitmap signature: a broken image, never "oversized"
    assert decoded.status == "corrupt_image" and "px" not in decoded.message


def png_chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    import zlib

    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def with_chunk_after_ihdr(png: bytes, chunk: bytes) -> bytes:
    return png[:33] + chunk + png[33:]  # signature (8) + IHDR (25)


@pytest.fixture
def real_png():
    from ..conftest import SAMPLE_PATIENT

    return sorted(SAMPLE_PATIENT.rglob("*.png"))[0].read_bytes()


def test_png_ancillary_chunks_are_dropped_before_decoding_with_the_pixels_unchanged(real_png):
    import zlib

    from idc_infer.preprocess import png_without_ancillary

    bad_text = with_chunk_after_ihdr(real_png, png_chunk(b"tEXt", b"k\x00v", crc=0))
    bad_icc = with_chunk_after_ihdr(real_png, png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(b"not a profile")))
    clean, notes = png_without_ancillary(bad_text)
    assert notes == ["PNG tEXt chunk has a bad checksum: ignored"]
    assert np.array_equal(
        cv2.imdecode(np.frombuffer(clean, np.uint8), -1), cv2.imdecode(np.frombuffer(real_png, np.uint8), -1)
    )
    assert png_without_ancillary(bad_icc)[1] == []  # a valid chunk cv2 ignores anyway: dropped without a note
    truncated = bad_text[:40]
    assert png_without_ancillary(truncated) == (truncated, [])  # the decoder judges what is not a chunk list


def test_png_transparency_survives_the_chunk_filter(tmp_path):
    """tRNS changes what cv2 decodes (a palette PNG with transparency gains alpha): it is kept."""
    from idc_infer.preprocess import png_without_ancillary

    from ..conftest import require_module

    Image = require_module("PIL.Image")  # noqa: N806 - the module, as PIL names it
    palette = tmp_path / "p.png"

    image = Image.new("P", (50, 50), 1)
    image.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    image.save(palette, transparency=0)
    data = palette.read_bytes()
    assert b"tRNS" in data
    clean, _ = png_without_ancillary(data)
    assert np.array_equal(
        cv2.imdecode(np.frombuffer(clean, np.uint8), -1), cv2.imdecode(np.frombuffer(data, np.uint8), -1)
    )


def test_libpng_warnings_do_not_reach_stderr_under_quiet_and_the_row_names_the_file(tmp_path, real_png):
    """libpng printed 'libpng warning: tEXt: CRC error' to stderr, under -q too, naming no file."""
    import csv
    import zlib

    patient = tmp_path / "P1"
    patient.mkdir()
    (patient / "P1_idx5_x0_y0_class0.png").write_bytes(real_png)
    (patient / "P1_idx5_x50_y0_class0.png").write_bytes(
        with_chunk_after_ihdr(real_png, png_chunk(b"tEXt", b"k\x00v", 0))
    )
    icc = png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(b"not a profile"))
    (patient / "P1_idx5_x100_y0_class0.png").write_bytes(with_chunk_after_ihdr(real_png, icc))
    done = subprocess.run(
        [sys.executable, "-m", "idc_infer", str(patient), "--out", str(tmp_path / "o"), "-q", "--no-review"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "libpng" not in done.stderr
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "o" / "P1.csv", encoding="utf-8"))}
    assert "tEXt chunk has a bad checksum" in rows["P1_idx5_x50_y0_class0.png"]["message"]
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert len({r["prob_idc"] for r in rows.values()}) == 1  # the same pixels, the same score


def _split_idat(png: bytes) -> tuple[bytes, bytes, bytes]:
    """(everything before IDAT, IDAT chunk, everything after) of a PNG with one IDAT."""
    start = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[start : start + 4])[0]
    return png[:start], png[start : start + 12 + length], png[start + 12 + length :]


def test_the_chunk_filter_never_turns_a_corrupt_png_into_a_good_one(tmp_path, real_png):
    """An ancillary chunk before IHDR, or between two IDATs, makes libpng refuse the file: it stays corrupt."""
    head, idat, tail = _split_idat(real_png)
    body = idat[8:-4]
    half = len(body) // 2
    first = struct.pack(">I", half) + b"IDAT" + body[:half] + struct.pack(">I", zlib.crc32(b"IDAT" + body[:half]))
    rest = body[half:]
    second = struct.pack(">I", len(rest)) + b"IDAT" + rest + struct.pack(">I", zlib.crc32(b"IDAT" + rest))
    cases = {
        "text_before_ihdr.png": real_png[:8] + png_chunk(b"tEXt", b"k\x00v") + real_png[8:],
        "text_between_idats.png": head + first + png_chunk(b"tEXt", b"k\x00v") + second + tail,
        "split_idat.png": head + first + second + tail,  # a valid file: stays ok
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        decoded = decode_file(tmp_path / name, Contract())
        assert (decoded.status == "ok") == (raw is not None), name
    assert decode_file(tmp_path / "split_idat.png", Contract()).status == "ok"


def test_an_animated_png_decodes_as_cv2_decodes_it(tmp_path):
    """cv2 reads an APNG's first frame, not the default image its IDAT holds: the filter leaves APNGs alone."""
    from ..conftest import require_module

    Image = require_module("PIL.Image")  # noqa: N806 - the module, as PIL names it
    frames = [Image.new("RGB", (50, 50), colour) for colour in ((200, 100, 150), (20, 200, 40), (90, 90, 250))]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], default_image=True)
    data = path.read_bytes()
    assert b"acTL" in data
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    decoded = decode_file(path, Contract())
    assert decoded.status == "ok" and np.array_equal(decoded.rgb, raw[..., ::-1][..., :3])


def test_a_batch_finished_at_once_gives_the_model_the_same_input_as_one_patch_at_a_time(tmp_path):
    """idc-infer decodes full-size patches with defer=True, finishes them a batch at a time (8-bit model pixels) and
    scales a model batch just before the model runs: that input must be the float32 tensor decode_file gives one
    patch at a time, bit for bit, under every scale, offset and channel order."""
    from idc_infer.preprocess import finish_batch, model_batch
    from idc_infer.quality import QualityControl

    from ..conftest import SAMPLE_PATIENT

    paths = sorted(SAMPLE_PATIENT.rglob("*.png"))
    assert len(paths) >= 10
    for contract in (CONTRACT, Contract(scale=2.0 / 255.0, offset=-1.0, channel_order="BGR")):
        deferred = [decode_file(path, contract, QualityControl(), defer=True) for path in paths]
        finish_batch(deferred, contract, QualityControl())
        alone = [decode_file(path, contract, QualityControl()) for path in paths]
        assert [d.status for d in deferred] == [d.status for d in alone]
        ok = [i for i, d in enumerate(alone) if d.status == "ok"]
        assert ok and all(deferred[i].ok_tensor().dtype == np.uint8 for i in ok)
        batch = model_batch([deferred[i].ok_tensor() for i in ok], contract)
        assert batch.dtype == np.float32
        np.testing.assert_array_equal(batch, np.stack([alone[i].ok_tensor() for i in ok]))
        # a batch mixing both kinds (a slide tile decoded alone beside deferred patches) is the same too
        mixed = model_batch([alone[ok[0]].ok_tensor(), deferred[ok[1]].ok_tensor()], contract)
        np.testing.assert_array_equal(mixed, np.stack([alone[ok[0]].ok_tensor(), alone[ok[1]].ok_tensor()]))


def test_nearest_resize_takes_the_rows_and_columns_of_the_integer_formula_for_every_shape():
    """resize_nearest gathers by flat pixel index (faster); it must pick nearest_indices' rows and columns for
    single images and stacks, edge-patch sizes, upscaling, one channel, empty stacks and non-contiguous views."""
    from idc_infer.preprocess import nearest_indices, resize_nearest

    rng = np.random.default_rng(1)
    for shape in [(50, 50, 3), (7, 50, 50, 3), (32, 42, 3), (3, 60, 45, 3), (1, 1, 3), (2, 5, 9, 1), (0, 50, 50, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for source in (image, image[..., ::-1], image.astype(np.float32)):
            for height, width in [(48, 48), (50, 50), (13, 7)]:
                rows, cols = nearest_indices(shape[-3], height), nearest_indices(shape[-2], width)
                expected = source.take(rows, axis=-3).take(cols, axis=-2)
                got = resize_nearest(source, height, width)
                assert got.shape == expected.shape and got.dtype == source.dtype
                np.testing.assert_array_equal(got, expected)


def test_rgb_pngs_decoded_straight_to_rgb_give_the_pixels_and_notes_of_the_general_path(tmp_path, real_png):
    """An 8-bit RGB PNG is decoded with IMREAD_COLOR_RGB (no conversion pass); one with a tRNS colour key, which
    IMREAD_UNCHANGED turns into an alpha channel, still takes the general path and says its alpha was dropped."""
    from idc_infer.preprocess import _filter_png, decode_bytes

    from ..conftest import require_module

    Image = require_module("PIL.Image")  # noqa: N806 - the module, as PIL names it
    raw = cv2.imdecode(np.frombuffer(real_png, np.uint8), cv2.IMREAD_UNCHANGED)
    decoded = decode_bytes(real_png, CONTRACT)
    assert decoded.status == "ok" and decoded.message == ""
    np.testing.assert_array_equal(decoded.rgb, raw[..., ::-1])
    assert _filter_png(real_png)[2] == hasattr(cv2, "IMREAD_COLOR_RGB")
    keyed = tmp_path / "keyed.png"
    Image.fromarray(raw[..., ::-1]).save(keyed, transparency=tuple(int(v) for v in raw[0, 0, ::-1]))
    data = keyed.read_bytes()
    assert b"tRNS" in data and data[25] == 2  # RGB with a colour key
    assert not _filter_png(data)[2]
    with_key = decode_bytes(data, CONTRACT)
    alone = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert alone.shape[2] == 4 and "alpha channel dropped" in with_key.message
    np.testing.assert_array_equal(with_key.rgb, cv2.cvtColor(alone, cv2.COLOR_BGRA2RGB))


def test_scaling_gives_the_float32_arithmetic_of_cast_times_scale_plus_offset_for_every_contract():
    """scale_pixels casts and multiplies in one call and leaves out a zero offset: the bits must be those of
    float32(pixel) * float32(scale) + float32(offset) for every scale and offset, -0.0 included (+ 0 turns a
    product of -0.0 into +0.0)."""
    import dataclasses

    from idc_infer.preprocess import scale_pixels

    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for scale, offset in [(1 / 255, 0.0), (2 / 255, -1.0), (-1 / 255, 0.0), (-0.0, 0.0), (0.0, 0.0), (1.0, 0.5)]:
        contract = dataclasses.replace(CONTRACT, scale=scale, offset=offset)
        expected = pixels.astype(np.float32) * np.float32(scale) + np.float32(offset)
        got = scale_pixels(pixels, contract)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32), err_msg=f"{scale}, {offset}")


@pytest.fixture
def inflating_here():
    """decode_bytes with ISA-L's inflate on, as in a worker process (processes.py); off again after."""
    from idc_infer import preprocess

    pytest.importorskip("isal", reason="isal is an install requirement; this checkout lacks it")
    preprocess.inflate_png_here(True)
    yield
    preprocess.inflate_png_here(False)


def _rows(pixels: np.ndarray) -> bytes:
    """A PNG's raw image data: each row's filter byte (0, none) and its RGB bytes."""
    return b"".join(b"\x00" + row.tobytes() for row in pixels)


def _png_of(width: int, height: int, idat_bodies: list[bytes], ihdr_tail: bytes = b"\x08\x02\x00\x00\x00") -> bytes:
    ihdr = png_chunk(b"IHDR", struct.pack(">II", width, height) + ihdr_tail)
    return (
        b"\x89PNG\r\n\x1a\n"
        + ihdr
        + b"".join(png_chunk(b"IDAT", body) for body in idat_bodies)
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.skipif(not hasattr(cv2, "IMREAD_COLOR_RGB"), reason="OpenCV < 4.10: plain RGB PNGs take the general path")
def test_png_data_inflated_here_gives_libpngs_own_pixels_and_verdicts(tmp_path, real_png, inflating_here):
    """A plain RGB PNG's image data is inflated by ISA-L and handed to libpng stored, to unfilter only: the same
    pixels as libpng's own inflate. Files the fast path must not judge go to libpng as they are, so their status
    and message are what they were: a bad IDAT CRC, data after the stream's end, a stream that inflates past the
    image (a bomb), one that ends early, an interlaced file."""
    from idc_infer import preprocess
    from idc_infer.preprocess import _filter_png, _with_stored_idat, decode_bytes

    from ..conftest import SAMPLE_PATIENT

    def both_ways(data: bytes):
        fast = decode_bytes(data, CONTRACT)
        preprocess.inflate_png_here(False)
        try:
            slow = decode_bytes(data, CONTRACT)
        finally:
            preprocess.inflate_png_here(True)
        assert (fast.status, fast.message) == (slow.status, slow.message)
        if slow.rgb is not None:
            np.testing.assert_array_equal(fast.rgb, slow.rgb)
        return fast

    for path in sorted(SAMPLE_PATIENT.rglob("*.png")):  # real patches: Paeth, Average, Up and Sub rows
        data = path.read_bytes()
        assert _with_stored_idat(_filter_png(data)[0]) is not None, path.name
        assert both_ways(data).status == "ok"
    head, idat, tail = _split_idat(real_png)
    body = idat[8:-4]
    split = head + png_chunk(b"IDAT", body[:100]) + png_chunk(b"IDAT", body[100:]) + tail
    assert _with_stored_idat(_filter_png(split)[0]) is not None and both_ways(split).status == "ok"
    # four random rows, repeated: the stream's back-references reach 4 rows (604 bytes) back
    small = np.tile(np.random.default_rng(1).integers(0, 256, (4, 50, 3), dtype=np.uint8), (13, 1, 1))[:50]
    raw = _rows(small)
    stream = zlib.compress(raw)
    assert both_ways(_png_of(50, 50, [stream])).status == "ok"

    def with_window(bits: int) -> bytes:  # the stream under a zlib header that declares 2**bits of window
        cmf = ((bits - 8) << 4) | 8
        return bytes([cmf, 31 - (cmf * 256) % 31]) + stream[2:]

    refused = {
        "more image data than the declared window (libpng refuses a reference past it)": _png_of(
            50, 50, [with_window(9)]
        ),
        "a window over 32 kB": _png_of(50, 50, [with_window(16)]),
        "a tile's 720 kB of image data": cv2.imencode(".png", np.zeros((400, 600, 3), np.uint8))[1].tobytes(),
        "bad IDAT CRC": _png_of(50, 50, [stream])[:-16] + b"\x00\x00\x00\x00" + _png_of(50, 50, [stream])[-12:],
        "data after the stream": _png_of(50, 50, [stream + b"\x00\x01"]),
        "a bomb": _png_of(50, 50, [zlib.compress(raw + bytes(10**6))]),
        "ends early": _png_of(50, 50, [zlib.compress(raw[:-151])]),
        "truncated stream": _png_of(50, 50, [stream[:-30]]),
        "interlaced": _png_of(50, 50, [stream], ihdr_tail=b"\x08\x02\x00\x00\x01"),
    }
    for why, data in refused.items():
        assert _with_stored_idat(_filter_png(data)[0]) is None, why
        both_ways(data)
    assert both_ways(refused["bad IDAT CRC"]).status == STATUS_CORRUPT
    window = "more image data than the declared window (libpng refuses a reference past it)"
    assert both_ways(refused[window]).status == STATUS_CORRUPT  # 604 bytes back, a 512-byte window
