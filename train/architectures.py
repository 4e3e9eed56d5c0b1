"""The model families of the seed projects, each with the optimizer its seed used."""

from __future__ import annotations

import logging

import keras
from keras import layers

from .cancernet import build_cancernet
from .options import ARCHITECTURES, OPTIMIZERS

log = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = {"cancernet": 1e-2, "simple-cnn": 1e-3, "transfer": 1e-4}


def default_learning_rate(arch: str, optimizer: str = "seed") -> float:
    """The seed's learning rate of ``arch``; Adam's 1e-3 for the from-scratch nets under adam-cosine."""
    if optimizer == "adam-cosine" and arch != "transfer":
        return 1e-3
    return DEFAULT_LEARNING_RATE[arch]


def build_simple_cnn(height: int = 48, width: int = 48, channels: int = 3, classes: int = 2) -> keras.Model:
    """The seed's plain CNN: 2x16, 2x32, 2x64 3x3 convs with max-pooling, Dense 128, Dense softmax."""
    inputs = keras.Input((height, width, channels), name="input")
    x = inputs
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dense(classes)(x)
    outputs = layers.Activation("softmax", dtype="float32", name="prob")(x)
    return keras.Model(inputs, outputs, name="simple_cnn")


def build_transfer(
    height: int = 48, width: int = 48, channels: int = 3, classes: int = 2, weights: str | None = "imagenet"
) -> keras.Model:
    """MobileNetV2 backbone (ImageNet weights when they can be downloaded) + a small head.

    The contract feeds [0, 1] pixels; the backbone expects [-1, 1], so the rescaling lives
    inside the model and the contract stays the same for every architecture.
    """
    inputs = keras.Input((height, width, channels), name="input")
    x = layers.Rescaling(2.0, offset=-1.0)(inputs)
    try:
        backbone = keras.applications.MobileNetV2(
            input_shape=(height, width, channels), include_top=False, weights=weights, alpha=0.35
        )
    except Exception as exc:  # offline lab or air-gapped GPU box: the download fails
        if weights is None:
            raise
        log.warning("ImageNet weights could not be loaded (%s); training the backbone from scratch", exc)
        weights = None
        backbone = keras.applications.MobileNetV2(
            input_shape=(height, width, channels), include_top=False, weights=None, alpha=0.35
        )
    x = backbone(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(classes)(x)
    outputs = layers.Activation("softmax", dtype="float32", name="prob")(x)
    # the name records what the backbone started from (train_meta.json reports it)
    started_from = "scratch" if weights is None else "imagenet" if weights == "imagenet" else "file"
    return keras.Model(inputs, outputs, name=f"transfer_mobilenetv2_{started_from}")


def build_model(
    arch: str, height: int, width: int, classes: int, transfer_weights: str | None = "imagenet"
) -> keras.Model:
    if arch == "cancernet":
        return build_cancernet(height, width, 3, classes)
    if arch == "simple-cnn":
        return build_simple_cnn(height, width, 3, classes)
    if arch == "transfer":
        return build_transfer(height, width, 3, classes, weights=transfer_weights)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


def make_optimizer(arch: str, learning_rate: float, epochs: int, optimizer: str = "seed", steps_per_epoch: int = 1):
    """The seed's optimizer of ``arch`` ("seed"), or Adam with a cosine decay to 0 over the run ("adam-cosine")."""
    if optimizer == "adam-cosine":
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, epochs * steps_per_epoch))
        return keras.optimizers.Adam(learning_rate=schedule)
    if optimizer != "seed":
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if arch == "cancernet":
        # the seed's Adagrad(lr, decay=lr/epochs): Keras 2 applied it every step, lr / (1 + decay * step)
        # (1e-2 falls to ~1.6e-4 after 40 epochs of the full set). Keras 3 dropped decay=, so a schedule.
        schedule = keras.optimizers.schedules.InverseTimeDecay(
            learning_rate, decay_steps=1, decay_rate=learning_rate / max(1, epochs)
        )
        return keras.optimizers.Adagrad(learning_rate=schedule)
    return keras.optimizers.Adam(learning_rate=learning_rate)
