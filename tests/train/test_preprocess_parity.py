"""Train's TF input pipeline and infer's cv2 decoder give the same tensor on real PNGs."""

import numpy as np
import pytest

from idc_infer.contract import Contract
from idc_infer.preprocess import decode_file

from ..conftest import require_module  # noqa: E402

tf = require_module("tensorflow")

from idc_train.pipeline import decode_and_preprocess  # noqa: E402

pytestmark = pytest.mark.tf


def _compare(paths, contract):
    assert paths
    for path in paths:
        ours = decode_file(path, contract)
        assert ours.status == "ok", path
        theirs = decode_and_preprocess(tf.constant(str(path)), contract).numpy()
        np.testing.assert_array_equal(theirs, ours.tensor, err_msg=str(path))


def test_tf_and_cv2_agree_on_shared_sample(shared_sample):
    _compare(sorted(shared_sample.rglob("*.png")), Contract())


def test_tf_and_cv2_agree_on_undersized_real_patches(real_data):
    import csv

    rows = list(csv.DictReader(open(real_data / "manifest.csv")))
    small = [real_data / r["path"] for r in rows if (r["width"], r["height"]) != ("50", "50")]
    _compare(small, Contract())


def test_tf_and_cv2_agree_on_synthetic_undersized(tmp_path):
    from idc_train.synthetic import write_patient

    patches = write_patient(tmp_path, "777", seed=1, grid=4)
    _compare([p.path for p in patches], Contract())


def test_seed_augmentation_moves_pixels_but_keeps_shape_and_range(tmp_path):
    from idc_train.pipeline import make_dataset
    from idc_train.synthetic import write_patient

    paths = [str(p.path) for p in write_patient(tmp_path, "5", seed=2, grid=4, undersized_edge=False)]
    plain = next(make_dataset(paths, [0] * len(paths), Contract(), 16).as_numpy_iterator())[0]
    moved = next(
        make_dataset(paths, [0] * len(paths), Contract(), 16, augment_images="seed", seed=3).as_numpy_iterator()
    )[0]
    assert moved.shape == plain.shape == (16, 48, 48, 3)
    assert 0.0 <= moved.min() and moved.max() <= 1.0
    assert np.abs(moved - plain).mean() > 0.01


def test_idc_augmentation_draws_per_image_and_stays_in_range(tmp_path):
    """Each patch gets its own flips, turn and colour jitter, not one draw for the whole batch."""
    import tensorflow as tf

    from idc_train.pipeline import make_dataset
    from idc_train.synthetic import write_patient

    tf.random.set_seed(4)
    path = str(write_patient(tmp_path, "6", seed=2, grid=2, undersized_edge=False)[0].path)
    same = next(make_dataset([path] * 32, [0] * 32, Contract(), 32).as_numpy_iterator())[0]
    dataset = make_dataset([path] * 32, [0] * 32, Contract(), 32, augment_images="idc")
    out = next(dataset.as_numpy_iterator())[0]
    assert out.shape == same.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert len({np.round(img, 4).tobytes() for img in out}) > 24  # 32 copies of one patch come out different
    assert out.mean(axis=(1, 2, 3)).std() > 0.01  # brightness/contrast jitter varies between images
    assert not np.allclose(out, next(dataset.as_numpy_iterator())[0])  # fresh draws every epoch (new iterator)
    again = make_dataset([path] * 32, [0] * 32, Contract(), 32, augment_images="idc")
    np.testing.assert_array_equal(next(again.as_numpy_iterator())[0], out)  # same seed, same run
