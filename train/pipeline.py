"""tf.data input: decode and preprocess patches exactly as the contract says (TF side)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from idc_infer.contract import Contract

from .options import AUGMENTATIONS

AUTOTUNE = tf.data.AUTOTUNE


def decode_resized(path: tf.Tensor, contract: Contract) -> tf.Tensor:
    """File path -> uint8 HWC patch at the model's input size (what the cache holds: 4x less than float)."""
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
    size = (contract.input_height_px, contract.input_width_px)
    if contract.undersized_policy == "pad":  # zeros below and right up to the native size, as idc-infer pads
        native = contract.native_patch_px
        shape = tf.shape(image)
        image = tf.image.pad_to_bounding_box(image, 0, 0, tf.maximum(shape[0], native), tf.maximum(shape[1], native))
    # "resize" undersized policy: nearest with half-pixel centres in integer arithmetic, the same
    # formula as idc_infer.preprocess.nearest_indices (tf.image.resize's float rounding differs on some sizes)
    image = tf.gather(image, _nearest_indices(tf.shape(image)[0], size[0]), axis=0)
    image = tf.gather(image, _nearest_indices(tf.shape(image)[1], size[1]), axis=1)
    image.set_shape((*size, 3))
    return image


def _nearest_indices(in_size: tf.Tensor, out_size: int) -> tf.Tensor:
    dst = tf.range(out_size, dtype=tf.int64)
    return ((2 * dst + 1) * tf.cast(in_size, tf.int64)) // (2 * out_size)


def to_model_input(image: tf.Tensor, contract: Contract) -> tf.Tensor:
    """uint8 patch(es) -> float32 scaled and ordered as the contract says (works on batches too)."""
    image = tf.cast(image, tf.float32) * contract.scale + contract.offset
    return image[..., ::-1] if contract.channel_order == "BGR" else image


def decode_and_preprocess(path: tf.Tensor, contract: Contract) -> tf.Tensor:
    """File path -> float32 HWC tensor; the TF twin of idc_infer.preprocess.decode_file."""
    return to_model_input(decode_resized(path, contract), contract)


def _flips_and_turns(unit: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """Random flips and right-angle rotation from seeds[0:3] (tissue has no up or left)."""
    unit = tf.image.stateless_random_flip_left_right(unit, seeds[0])
    unit = tf.image.stateless_random_flip_up_down(unit, seeds[1])
    return tf.image.rot90(unit, k=tf.random.stateless_uniform((), seeds[2], 0, 4, dtype=tf.int32))


def augment(image: tf.Tensor, contract: Contract, seed: tf.Tensor) -> tf.Tensor:
    """Flips, right-angle rotations and stain-like colour jitter (on [0, 1] pixel scale).

    Stateless ops drawn from ``seed`` (one per patch and epoch, see make_dataset): runs are
    reproducible, yet every epoch sees new draws even with TF_DETERMINISTIC_OPS, where stateful
    random ops in a map restart their sequence with every new iterator (every Keras epoch).
    Colour jitter matters: non-IDC patches are much brighter, and without it a CNN learns
    brightness instead of morphology.
    """
    lo, hi = contract.offset, contract.offset + 255.0 * contract.scale
    seeds = tf.random.experimental.stateless_split(seed, num=7)
    unit = _flips_and_turns((image - lo) / (hi - lo), seeds)
    # stronger jitter (brightness 0.25, contrast/saturation 0.6-1.4, hue 0.08) lowered validation
    # ROC-AUC on the real patches from 0.95 to 0.92; these values kept the better model
    unit = tf.image.stateless_random_brightness(unit, 0.12, seeds[3])
    unit = tf.image.stateless_random_contrast(unit, 0.75, 1.25, seeds[4])
    unit = tf.image.stateless_random_saturation(unit, 0.75, 1.25, seeds[5])
    unit = tf.image.stateless_random_hue(unit, 0.04, seeds[6])
    unit = tf.clip_by_value(unit, 0.0, 1.0)
    return unit * (hi - lo) + lo


# Ruifrok & Johnston 2001 stain vectors (skimage.color's rgb_from_hed), as Tellez et al. 2019 used them
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)
HED_SIGMA = 0.05  # Tellez et al. 2019 "HED-light": alpha ~ U(1 - s, 1 + s), beta ~ U(-s, s) per stain channel
_OD_FLOOR = 1e-6


def hed_jitter(unit: tf.Tensor, seed: tf.Tensor, sigma: float = HED_SIGMA) -> tf.Tensor:
    """Stain augmentation in HED space (Tellez et al. 2019): RGB -> optical density -ln(RGB) ->
    haematoxylin, eosin, DAB concentrations; scale and shift each by its own random draw; back to RGB.

    Works on one [0, 1] RGB patch. Concentrations are in natural-log optical density, as in the paper
    and skimage before 0.19: skimage's rgb2hed now divides them by -ln(1e-6) = 13.8, and a shift of
    0.05 in those units moved the RGB of real patches by 0.1-0.3 on average (14x "HED-light").
    Negative concentrations are kept, so the round trip is exact at sigma 0.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    alpha = tf.random.stateless_uniform((3,), seeds[0], 1.0 - sigma, 1.0 + sigma)
    beta = tf.random.stateless_uniform((3,), seeds[1], -sigma, sigma)
    stains = tf.tensordot(-tf.math.log(tf.maximum(unit, _OD_FLOOR)), HED_FROM_RGB, axes=1)
    stains = stains * alpha + beta
    back = tf.exp(-tf.tensordot(stains, RGB_FROM_HED, axes=1))
    return tf.clip_by_value(back, 0.0, 1.0)


def augment_hed(image: tf.Tensor, contract: Contract, seed: tf.Tensor) -> tf.Tensor:
    """Flips, right-angle rotations, brightness/contrast and HED stain jitter (Tellez et al. 2019's
    "basic + BC + HED-light"): the RGB hue/saturation jitter of ``augment`` replaced by stain jitter."""
    lo, hi = contract.offset, contract.offset + 255.0 * contract.scale
    seeds = tf.random.experimental.stateless_split(seed, num=6)
    unit = _flips_and_turns((image - lo) / (hi - lo), seeds)
    unit = hed_jitter(unit, seeds[3])
    unit = tf.image.stateless_random_brightness(unit, 0.12, seeds[4])
    unit = tf.image.stateless_random_contrast(unit, 0.75, 1.25, seeds[5])
    unit = tf.clip_by_value(unit, 0.0, 1.0)
    return unit * (hi - lo) + lo


def seed_geometric_augmenter(seed: int = 0):
    """The seed tutorial's ImageDataGenerator: rotation 20 deg, zoom 0.05, shifts 0.1, shear 0.05,
    flips, fill 'nearest' -- as Keras preprocessing layers, applied to whole batches in tf.data."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=seed),
            layers.RandomRotation(20 / 360, fill_mode="nearest", seed=seed),
            layers.RandomZoom(0.05, fill_mode="nearest", seed=seed),
            layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed),
            layers.RandomShear(0.05, 0.05, fill_mode="nearest", seed=seed),
        ],
        name="seed_augmentation",
    )


def make_dataset(
    paths: list[str],
    labels: list[int],
    contract: Contract,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment_images: bool | str = False,
    seed: int = 0,
    cache: bool = True,
    weights: Sequence[float] | np.ndarray | None = None,
) -> tf.data.Dataset:
    """Batched (image, one-hot label[, weight]) dataset; decoded patches cached once, shuffled and augmented
    per epoch. ``weights``: a per-patch training weight (class and patient weighting), yielded third.

    ``augment_images``: "idc" (flips, right-angle rotations, colour jitter; True means this), "hed"
    (flips, rotations, brightness/contrast, HED stain jitter), "seed" (the tutorial's geometric
    augmentation), "both" (idc + seed), or "none"/False.
    """
    mode = "idc" if augment_images is True else "none" if augment_images is False else augment_images
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {mode!r}; choose from {', '.join(AUGMENTATIONS)}")
    paths, labels = list(paths), list(labels)
    weights = None if weights is None else list(weights)
    if shuffle:  # discovery order is by patient and class: mix it once, so a bounded shuffle buffer mixes well
        order = np.random.default_rng(seed).permutation(len(paths))
        paths, labels = [paths[i] for i in order], [labels[i] for i in order]
        weights = None if weights is None else [weights[i] for i in order]
    n_classes = len(contract.class_names)
    # the label (1: IDC) is the one-hot column of the contract's positive class
    positive = contract.positive_class_index
    labels = [positive if y == 1 else 1 - positive for y in labels] if positive != 1 else labels
    if weights is None:
        ds = tf.data.Dataset.from_tensor_slices((paths, labels))
        ds = ds.map(lambda p, y: (decode_resized(p, contract), tf.one_hot(y, n_classes)), num_parallel_calls=AUTOTUNE)
    else:
        ds = tf.data.Dataset.from_tensor_slices((paths, labels, np.asarray(weights, dtype=np.float32)))
        ds = ds.map(
            lambda p, y, w: (decode_resized(p, contract), tf.one_hot(y, n_classes), w), num_parallel_calls=AUTOTUNE
        )
    if cache:
        ds = ds.cache()  # uint8: the full public set is ~1.9 GB decoded
    if shuffle:
        ds = ds.shuffle(min(len(paths), 20000), seed=seed, reshuffle_each_iteration=True)
    if mode in ("idc", "hed", "both"):
        per_patch = augment_hed if mode == "hed" else augment
        # a fresh stateless seed per patch, different on every pass over the data
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (per_patch(to_model_input(xy[0], contract), contract, s), *xy[1:]),
            num_parallel_calls=AUTOTUNE,
        )
        ds = ds.batch(batch_size)
    else:
        ds = ds.batch(batch_size).map(
            lambda x, *rest: (to_model_input(x, contract), *rest), num_parallel_calls=AUTOTUNE
        )
    if mode in ("seed", "both"):
        geometric = seed_geometric_augmenter(seed)
        ds = ds.map(lambda x, *rest: (geometric(x, training=True), *rest), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
