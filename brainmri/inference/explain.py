"""Grad-CAM on the served model's last convolutional block, and the PNGs that show it.

`build_functions` imports TensorFlow and is called only from `Predictor.load`; the PNG helpers
need only OpenCV, so the web side can render heatmaps without importing TensorFlow.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

__all__ = [
    "COLORMAP",
    "build_functions",
    "explained_model",
    "find_last_conv_layer",
    "heatmap_png",
    "legend_data_uri",
    "overlay_data_uri",
]

# Perceptually ordered (dark purple = low, yellow = high); the legend is drawn from the same map.
COLORMAP = cv2.COLORMAP_INFERNO


def find_last_conv_layer(model, preferred: str | None = None) -> str | None:
    """`preferred` when the model has it, else the last layer with a 4-D (N, H, W, C) output."""
    names = [layer.name for layer in model.layers]
    if preferred and preferred in names:
        return preferred
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4:
            return layer.name
    return None


def build_functions(model, conv_name: str, input_shape: tuple[int, int, int]):
    """Traced forward and Grad-CAM functions over one multi-output model built once at load.

    Returns:
        (forward, gradcam): forward(x) -> (softmax (N, K), pooled last-conv features (N, C));
        gradcam(x, class_index) -> (heatmaps (N, H, W) in [0, 1], softmax (N, K)). The class
        score differentiated is the pre-softmax logit when the model ends in a softmax Dense
        layer (the usual Grad-CAM choice), else log p.
    """
    import tensorflow as tf

    multi, head, softmax_dense = _explained(model, conv_name, input_shape)
    spec = tf.TensorSpec((None, *input_shape), tf.float32)

    def class_scores(pre, probs):
        if softmax_dense:
            logits = tf.matmul(pre, head.kernel)
            return logits + head.bias if head.use_bias else logits
        return tf.math.log(probs + 1e-12)

    # autograph=False: plain TensorFlow code needs no conversion, and autograph would leave
    # __autograph_generated_file*.py files in the temp folder at every worker start.
    @tf.function(input_signature=[spec], reduce_retracing=True, autograph=False)
    def forward(x):
        conv_out, probs, *_ = multi(x, training=False)
        return probs, tf.reduce_mean(conv_out, axis=[1, 2])

    @tf.function(input_signature=[spec, tf.TensorSpec((None,), tf.int32)], reduce_retracing=True,
                 autograph=False)
    def gradcam(x, class_index):
        with tf.GradientTape() as tape:
            conv_out, probs, *rest = multi(x, training=False)
            tape.watch(conv_out)
            scores = class_scores(rest[0] if rest else None, probs)
            chosen = tf.gather(scores, class_index, axis=1, batch_dims=1)
        grads = tape.gradient(chosen, conv_out)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * conv_out, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, input_shape[:2], method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        return cam, probs

    return forward, gradcam


def explained_model(model, conv_name: str, input_shape: tuple[int, int, int]):
    """A Keras model over the same layers whose outputs start [conv activations, softmax]."""
    return _explained(model, conv_name, input_shape)[0]


def _explained(model, conv_name: str, input_shape: tuple[int, int, int]):
    """(multi-output model, last layer, whether it is a softmax Dense) for `build_functions`."""
    import keras

    head = model.layers[-1]
    softmax_dense = (isinstance(head, keras.layers.Dense)
                     and getattr(head.activation, "__name__", "") == "softmax")
    if isinstance(model, keras.Sequential):
        # A Sequential loaded from .h5 has no symbolic graph until called: rebuild one over
        # the same (shared) layers.
        inputs = keras.Input(input_shape)
        tensors, x = {}, inputs
        for layer in model.layers:
            pre_head, x = x, layer(x)
            tensors[layer.name] = x
        conv, output, model_inputs = tensors[conv_name], x, [inputs]
    else:
        conv, output, model_inputs = model.get_layer(conv_name).output, model.output, model.inputs
        pre_head = head.input
    outputs = [conv, output] + ([pre_head] if softmax_dense else [])
    multi = keras.Model(model_inputs, outputs, name=f"{model.name}_explain")
    return multi, head, softmax_dense


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """The heatmap as an 8-bit grey PNG of the same shape (0 = no evidence, 255 = the most)."""
    return _png(np.clip(np.asarray(heatmap) * 255.0 + 0.5, 0, 255).astype(np.uint8))


def overlay_data_uri(heatmap: np.ndarray) -> str:
    """PNG data URI of the coloured heatmap, transparent where the evidence is low."""
    levels = np.clip(np.asarray(heatmap) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(levels, COLORMAP)
    alpha = (np.clip(np.asarray(heatmap), 0.0, 1.0) ** 0.7 * 200).astype(np.uint8)
    rgba = np.dstack([bgr, alpha])  # OpenCV writes BGRA order for 4-channel PNGs
    return "data:image/png;base64," + base64.b64encode(_png(rgba)).decode("ascii")


def legend_data_uri(width: int = 256, height: int = 12) -> str:
    """PNG data URI of the colour scale, low on the left, from the heatmap's own colour map."""
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    return "data:image/png;base64," + base64.b64encode(_png(cv2.applyColorMap(ramp, COLORMAP))).decode("ascii")
