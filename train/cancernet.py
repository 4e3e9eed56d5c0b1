"""CancerNet, as the seed tutorial describes it, built with the Functional API (exports cleanly)."""

from __future__ import annotations

import keras
from keras import layers


def build_cancernet(height: int = 48, width: int = 48, channels: int = 3, classes: int = 2) -> keras.Model:
    """SeparableConv2D 32 | 2x64 | 3x128, each conv + ReLU + BN; pool + dropout 0.25 per block;
    Dense 256 + ReLU + BN + dropout 0.5; Dense softmax."""
    inputs = keras.Input((height, width, channels), name="input")
    x = inputs
    for filters, repeats in ((32, 1), (64, 2), (128, 3)):
        for _ in range(repeats):
            x = layers.SeparableConv2D(filters, (3, 3), padding="same")(x)
            x = layers.Activation("relu")(x)
            x = layers.BatchNormalization(axis=-1)(x)
        x = layers.MaxPooling2D(pool_size=(2, 2))(x)
        x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256)(x)
    x = layers.Activation("relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(classes)(x)
    outputs = layers.Activation("softmax", dtype="float32", name="prob")(x)  # float32 under mixed precision
    return keras.Model(inputs, outputs, name="cancernet")
