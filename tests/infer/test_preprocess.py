import os

import cv2
import numpy as np
import pytest

from idc_infer.contract import Contract
from idc_infer.preprocess import decode_file, preprocess_rgb
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
    from pathlib import Path

    path = tmp_path / "locked.png"
    path.write_bytes(b"x")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    decoded = decode_file(path, CONTRACT)
    assert decoded.status == "unreadable" and "permission" in decoded.message
