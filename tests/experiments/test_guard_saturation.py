"""experiments/guard_saturation.py's measure, on drawn images: a clipped bone ring counts, an
MRI-like slice scaled to its brightest pixel does not."""

from __future__ import annotations

import cv2
import numpy as np

from experiments import guard_saturation


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def _head(ring_value: int) -> np.ndarray:
    """A grey disc on black inside a 10-pixel ring of `ring_value`."""
    image = np.zeros((128, 128), np.uint8)
    cv2.circle(image, (64, 64), 50, ring_value, -1)
    cv2.circle(image, (64, 64), 40, 110, -1)
    return image


def test_a_clipped_ring_is_the_share_of_the_head_it_covers():
    share = guard_saturation.saturated_share(_png(_head(255)))
    ring = np.pi * (50**2 - 40**2) / (np.pi * 50**2)
    assert abs(share - ring) < 0.03


def test_a_slice_whose_brightest_pixels_are_few_scores_near_zero():
    image = _head(140)
    image[60:63, 60:63] = 255  # one small bright spot: the export's maximum
    assert guard_saturation.saturated_share(_png(image)) < 0.01


def test_a_black_image_scores_zero():
    assert guard_saturation.saturated_share(_png(np.zeros((32, 32), np.uint8))) == 0.0
