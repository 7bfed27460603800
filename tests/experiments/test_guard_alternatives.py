"""experiments/guard_alternatives.py's three rules, on drawn numbers: the tile shuffle moves
tiles without changing them, the joint rule refuses what is borderline on both scores, and the
positional prototypes score a training map zero and a map moved to another position higher."""

from __future__ import annotations

import numpy as np

from experiments import guard_alternatives


def _tiles_up_to_turns(image: np.ndarray, grid: int) -> list[bytes]:
    """The image's grid x grid tiles, each in the turn whose bytes sort first, sorted."""
    side = image.shape[0] // grid
    return sorted(min(np.rot90(image[r * side:(r + 1) * side, c * side:(c + 1) * side], k).tobytes()
                      for k in range(4))
                  for r in range(grid) for c in range(grid))


def test_shuffled_tiles_are_the_same_tiles_in_another_order():
    rng = np.random.default_rng(0)
    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # every pixel distinct
    for _ in range(20):
        out = guard_alternatives.shuffle_tiles(image, rng)
        assert out.shape == image.shape and not np.array_equal(out, image)
        assert sorted(out.ravel().tolist()) == sorted(image.ravel().tolist())
        # Every tile of the grid it used reappears whole, at most turned.
        assert any(_tiles_up_to_turns(out, g) == _tiles_up_to_turns(image, g) for g in (2, 4))


def test_the_joint_rule_refuses_what_is_borderline_on_both_scores():
    rng = np.random.default_rng(1)
    logits = rng.normal(5.0, 1.0, 4000)
    distances = np.exp(rng.normal(0.0, 0.3, 4000))
    rule = guard_alternatives.JointRule(logits, distances, weight=1.0, tail=0.005)
    assert np.mean(rule.refused(logits, distances)) < 0.01
    # Each score alone at its own 0.5 % tail (where the union would refuse it) passes; both
    # together do not.
    low_logit, high_distance = np.quantile(logits, 0.005), np.quantile(distances, 0.995)
    assert not rule.refused(np.array([low_logit]), np.array([np.median(distances)]))[0]
    assert not rule.refused(np.array([np.median(logits)]), np.array([high_distance]))[0]
    assert rule.refused(np.array([low_logit]), np.array([high_distance]))[0]


def test_positional_prototypes_see_where_a_feature_is():
    rng = np.random.default_rng(2)
    maps = np.zeros((200, 2, 2, 3))
    maps[:, 0, 0, 0] = 1.0 + rng.normal(0, 0.01, 200)  # channel 0 lights up top-left only
    maps[:, 1, 1, 1] = 1.0 + rng.normal(0, 0.01, 200)  # channel 1 bottom-right only
    fit = guard_alternatives.PositionalPrototypes(maps, count=4)
    assert fit.score(maps).max() < 0.01
    moved = maps[:5, ::-1, ::-1].copy()  # the same features at the other corners
    assert fit.score(moved).min() > 1.0
