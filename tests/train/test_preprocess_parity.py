"""Train's TF input pipeline and infer's cv2 decoder give the same tensor on real PNGs."""
import numpy as np
import pytest

from idc_infer.contract import Contract
from idc_infer.preprocess import decode_file

tf = pytest.importorskip("tensorflow")

from idc_train.pipeline import decode_and_preprocess  # noqa: E402


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
    moved = next(make_dataset(paths, [0] * len(paths), Contract(), 16, augment_images="seed", seed=3).as_numpy_iterator())[0]
    assert moved.shape == plain.shape == (16, 48, 48, 3)
    assert 0.0 <= moved.min() and moved.max() <= 1.0
    assert np.abs(moved - plain).mean() > 0.01
