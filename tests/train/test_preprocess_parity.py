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


def test_tf_and_cv2_agree_when_the_contract_pads_undersized_patches(real_data):
    """A contract that zero-pads short edge patches: training must pad them as idc-infer does, not stretch."""
    import csv

    rows = list(csv.DictReader(open(real_data / "manifest.csv")))
    small = [real_data / r["path"] for r in rows if (r["width"], r["height"]) != ("50", "50")][:40]
    contract = Contract(undersized_policy="pad")
    _compare(small, contract)
    stretched = decode_and_preprocess(tf.constant(str(small[0])), Contract()).numpy()
    assert not np.array_equal(stretched, decode_file(small[0], contract).tensor)  # the policy made a difference


def test_training_leaves_out_the_patches_the_contract_refuses(tmp_path):
    """idc-infer refuses a patch larger than 50 px (and, under 'refuse', a short one): training must not learn
    from, or be judged on, pixels inference never scores; the sets are filtered once, before labels are taken."""
    import cv2

    from idc_train.data import LabelledPatch, drop_refused_sizes, fits_contract

    sizes = {"big.png": (60, 60), "short.png": (32, 50), "ok.png": (50, 50)}
    for name, (w, h) in sizes.items():
        cv2.imwrite(str(tmp_path / name), np.full((h, w, 3), 128, dtype=np.uint8))
    paths = [tmp_path / name for name in sizes]
    assert [fits_contract(p, Contract()) for p in paths] == [False, True, True]
    strict = Contract(undersized_policy="refuse")
    assert [fits_contract(p, strict) for p in paths] == [False, False, True]
    sets = {"val": [LabelledPatch(p, "P1", 1) for p in paths]}
    assert [p.path.name for p in drop_refused_sizes(sets, strict)["val"]] == ["ok.png"]
    assert drop_refused_sizes(sets, Contract(oversized_policy="resize")) is sets  # nothing refused: untouched


@pytest.mark.slow
def test_training_with_oversized_patches_in_every_set_runs_and_leaves_them_out(tmp_path, caplog):
    """The review's crash: a 60x60 patch per class per patient made validation labels and probabilities differ in
    length (make_dataset dropped them, train() did not)."""
    import cv2

    from idc_train.synthetic import write_cohort
    from idc_train.training import TrainConfig, train

    data = tmp_path / "data"
    write_cohort(data, n_patients=6, seed=3, grid=5)
    for patient in sorted(p for p in data.iterdir() if p.is_dir()):
        for label in ("0", "1"):
            (patient / label).mkdir(exist_ok=True)
            big = np.full((60, 60, 3), 150 + 40 * int(label), dtype=np.uint8)
            cv2.imwrite(str(patient / label / f"{patient.name}_idx5_x9000_y9000_class{label}.png"), big)
    with caplog.at_level("WARNING"):
        meta = train(TrainConfig(data, tmp_path / "run", epochs=1, batch_size=16, seed=0, patience=0))
    assert "left out, their size refused" in caplog.text
    import csv

    split = list(csv.DictReader(open(tmp_path / "run" / "split.csv", encoding="utf-8")))
    val = [row["patient_id"] for row in split if row["set"] == "val"]
    fitting = sum(1 for pid in val for path in (data / pid).rglob("*.png") if "x9000" not in path.name)
    assert meta["metrics"]["val"]["n"] == fitting  # scored on exactly the patches idc-infer would score


def test_the_one_hot_label_follows_the_contracts_positive_class(tmp_path):
    import cv2

    from idc_train.pipeline import make_dataset

    path = tmp_path / "p.png"
    cv2.imwrite(str(path), np.full((50, 50, 3), 128, dtype=np.uint8))
    for positive, expected in ((1, [[0, 1], [1, 0]]), (0, [[1, 0], [0, 1]])):
        contract = Contract(class_names=("IDC", "non-IDC") if positive == 0 else ("non-IDC", "IDC"))
        contract = contract.replace(positive_class_index=positive)
        _, onehot = next(make_dataset([str(path)] * 2, [1, 0], contract, 2, cache=False).as_numpy_iterator())
        assert onehot.tolist() == expected  # label 1 (IDC) sits in the positive class's column
