"""The training augmentations that issue 32 added: random tissue contrast and a skull-stripped look."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _head(size: int = 96, ring: float = 1.0, tissue: float = 0.4, blob: float = 0.8) -> np.ndarray:
    """A synthetic axial slice: air, a bright skull ring, grey tissue and a brighter 'tumour'."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    image = np.zeros((size, size), np.float32)
    image[radius < 0.42 * size] = ring
    image[radius < 0.36 * size] = tissue
    image[np.hypot(yy - size * 0.45, xx - size * 0.55) < 0.08 * size] = blob
    return image[..., None]


def _batch(n: int = 8) -> np.ndarray:
    return np.stack([_head() for _ in range(n)])


def test_random_contrast_keeps_shape_range_and_black_air():
    import tensorflow as tf

    from brainmri.training.trainer import randomise_contrast

    tf.random.set_seed(0)
    batch = _batch()
    out = randomise_contrast(tf.constant(batch), gin=0.5, remap=0.5).numpy()
    assert out.shape == batch.shape and out.min() >= 0.0 and out.max() <= 1.0
    corner = out[:, :8, :8, 0]
    assert np.all(corner == 0.0), "the air outside the head must stay black"
    changed = [not np.allclose(o, b, atol=1e-3) for o, b in zip(out, batch)]
    assert all(changed), "gin + remap = 1: every image gets a new contrast"


def test_random_contrast_can_reverse_the_order_of_tissues():
    import tensorflow as tf

    from brainmri.training.trainer import randomise_contrast

    tf.random.set_seed(1)
    batch = _batch(64)
    out = randomise_contrast(tf.constant(batch), gin=0.5, remap=0.5).numpy()
    tissue = out[:, 48, 20, 0]  # inside the head, away from the blob
    blob = out[:, int(96 * 0.45), int(96 * 0.55), 0]
    # On T1 a tumour may be darker than tissue and on T2 brighter: both orders must occur.
    assert (blob > tissue).any() and (blob < tissue).any()


def test_random_contrast_off_changes_nothing():
    import tensorflow as tf

    from brainmri.training.trainer import randomise_contrast

    batch = _batch()
    out = randomise_contrast(tf.constant(batch), gin=0.0, remap=0.0).numpy()
    np.testing.assert_allclose(out, batch, atol=1e-6)


def test_skull_strip_removes_the_ring_and_keeps_the_tumour():
    import tensorflow as tf

    from brainmri.training.trainer import strip_skull

    tf.random.set_seed(0)
    batch = _batch()
    out = strip_skull(tf.constant(batch), share=1.0).numpy()
    assert out.shape == batch.shape and out.min() >= 0.0 and out.max() <= 1.0
    for image in out[..., 0]:
        # With the ring (1.0) gone, the blob (0.8) is the brightest: rescaled to 1, the tissue
        # (0.4) becomes 0.5. With the ring kept, the tissue would stay at 0.4.
        tissue = np.median(image[image > 0.2])
        assert tissue == pytest.approx(0.5, abs=0.04)
        assert (image > 0.95).sum() > 20, "the tumour must survive the stripping"
        # The brain now fills the crop, as a skull-stripped slice does after preprocessing.
        assert (image > 0.2).mean() > 0.5


def test_skull_strip_share_zero_changes_nothing():
    import tensorflow as tf

    from brainmri.training.trainer import strip_skull

    batch = _batch()
    np.testing.assert_allclose(strip_skull(tf.constant(batch), share=0.0).numpy(), batch)
