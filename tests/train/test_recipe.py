"""The training recipe's pieces: HED stain jitter, patient weighting, the Adam schedule."""

import numpy as np
import pytest

from ..conftest import require_module  # noqa: E402

tf = require_module("tensorflow")

from idc_infer.contract import Contract  # noqa: E402
from idc_train.pipeline import hed_jitter, make_dataset  # noqa: E402
from idc_train.training import patch_weights  # noqa: E402

pytestmark = pytest.mark.tf


def _he_like_patch(seed=0):
    rng = np.random.default_rng(seed)
    pink = np.array([0.85, 0.55, 0.75]) + rng.normal(0, 0.05, (48, 48, 3))
    return tf.constant(np.clip(pink, 0.05, 1.0), tf.float32)


def test_hed_round_trip_without_jitter_keeps_the_patch():
    patch = _he_like_patch()
    back = hed_jitter(patch, tf.constant([1, 2], tf.int64), sigma=0.0).numpy()
    np.testing.assert_allclose(back, patch.numpy(), atol=2e-3)


def test_hed_jitter_changes_the_stain_and_stays_in_range():
    patch = _he_like_patch()
    outs = [hed_jitter(patch, tf.constant([s, 7], tf.int64), sigma=0.2).numpy() for s in range(6)]
    assert all(0.0 <= o.min() and o.max() <= 1.0 for o in outs)
    means = np.array([o.mean(axis=(0, 1)) for o in outs])
    assert means.std(axis=0).max() > 0.01  # different draws give different stain mixes
    assert np.abs(outs[0] - patch.numpy()).mean() > 0.005


def test_hed_augmented_dataset_yields_patches_in_range(tmp_path):
    from idc_train.synthetic import write_patient

    paths = [str(p.path) for p in write_patient(tmp_path, "5", seed=2, grid=4, undersized_edge=False)]
    x, y = next(make_dataset(paths, [0] * len(paths), Contract(), 16, augment_images="hed", seed=1).as_numpy_iterator())
    assert x.shape == (16, 48, 48, 3) and 0.0 <= x.min() and x.max() <= 1.0


def test_weighted_dataset_yields_the_weight_of_each_patch(tmp_path):
    from idc_train.synthetic import write_patient

    paths = [str(p.path) for p in write_patient(tmp_path, "5", seed=2, grid=2, undersized_edge=False)]
    weights = [1.0, 2.0, 3.0, 4.0]
    _, _, w = next(make_dataset(paths, [0, 1, 0, 1], Contract(), 4, weights=weights).as_numpy_iterator())
    assert w.tolist() == weights


def test_patient_weights_none_are_the_class_weights():
    labels = [0] * 6 + [1] * 2
    w = patch_weights(labels, ["a"] * 4 + ["b"] * 4, "none")
    assert w[:6].tolist() == pytest.approx([8 / 12] * 6) and w[6:].tolist() == pytest.approx([8 / 4] * 2)


@pytest.mark.parametrize("mode,ratio", [("sqrt", 10.0), ("equal", 1.0)])
def test_patient_weights_make_a_big_patient_weigh_less(mode, ratio):
    """A patient of 100 patches against one of 1: in total it weighs sqrt(100) = 10x (sqrt) or 1x (equal)."""
    pids = ["big"] * 100 + ["small"]
    labels = [0] * 50 + [1] * 50 + [0]
    w = patch_weights(labels, pids, mode)
    big_non_idc, small = w[:50].sum(), w[100]
    # within the non-IDC class, the big patient's 50 patches against the small patient's one
    assert big_non_idc / small == pytest.approx(ratio * 50 / 100)
    assert w.mean() == pytest.approx(1.0)
    assert w[np.array(labels) == 0].sum() == pytest.approx(w[np.array(labels) == 1].sum())


def test_unknown_patient_weighting_is_refused():
    with pytest.raises(ValueError, match="thirds"):
        patch_weights([0, 1], ["a", "b"], "thirds")


def test_adam_cosine_decays_to_zero_over_the_run():
    from idc_train.architectures import make_optimizer

    opt = make_optimizer("cancernet", 1e-3, epochs=4, optimizer="adam-cosine", steps_per_epoch=10)
    schedule = opt.learning_rate if callable(opt.learning_rate) else opt._learning_rate
    assert float(schedule(0)) == pytest.approx(1e-3) and float(schedule(40)) == pytest.approx(0.0, abs=1e-9)


def test_hed_light_moves_colours_a_little_not_a_lot():
    """HED-light (sigma 0.05, optical density in natural log units as Tellez et al.) changes an H&E-like
    patch by a few percent; the 1/ln(1e-6)-scaled concentrations of skimage >= 0.19 made it ~14x stronger."""
    patch = _he_like_patch(3)
    moves = [np.abs(hed_jitter(patch, tf.constant([s, 5], tf.int64)).numpy() - patch.numpy()).mean() for s in range(8)]
    assert 0.002 < np.mean(moves) < 0.05
