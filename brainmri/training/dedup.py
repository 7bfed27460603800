"""Find near-duplicate images with a perceptual hash, so no duplicate straddles two splits.

A 64-bit DCT hash (pHash) survives re-encoding, resizing and small intensity changes. Images
whose hashes differ in at most `max_distance` bits are joined into one group (union-find), and
groups, not images, are what the splitter assigns to train, validation and test.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "DuplicateGroup",
    "duplicate_groups",
    "group_near_duplicates",
    "hamming_pairs",
    "perceptual_hash",
]

# Measured on the SARTAJ set: at <= 4 bits, 260 of the 394 Testing images have a copy in
# Training (the data set README, with another pHash, finds 262) and 16 pairs disagree on the
# label. At 6 and above, chains of merely similar slices join across classes (111 conflicting
# pairs at 6, 592 at 8), so 4 is the default.
DEFAULT_MAX_DISTANCE = 4


def perceptual_hash(gray: np.ndarray) -> int:
    """64-bit pHash of a 2-D grayscale image (DCT of a 32×32 thumbnail, 8×8 low frequencies)."""
    thumb = cv2.resize(gray.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(thumb)[:8, :8].flatten()
    # The DC term only says how bright the image is; compare the others to their median.
    bits = low > np.median(low[1:])
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def _bits(hashes: np.ndarray) -> np.ndarray:
    """(N, 64) 0/1 matrix of the hashes' bits."""
    as_bytes = np.asarray(hashes, dtype=">u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(as_bytes, axis=1)


def hamming_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 2048):
    """Yield (i, j, distance) for every pair i < j within `max_distance` bits.

    Works in row chunks so memory stays O(chunk × N) for large data sets.
    """
    bits = _bits(hashes).astype(np.float32)
    ones = bits.sum(axis=1)
    for start in range(0, len(bits), chunk):
        block = bits[start : start + chunk]
        # |a xor b| = |a| + |b| - 2 a·b
        distance = ones[start : start + chunk, None] + ones[None, :] - 2.0 * block @ bits.T
        rows, cols = np.nonzero(distance <= max_distance + 0.5)
        for r, c in zip(rows, cols):
            i = start + int(r)
            if i < c:
                yield i, int(c), int(round(distance[r, c]))


def group_near_duplicates(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Group ids (0..G-1, by first appearance) joining every pair within `max_distance` bits."""
    parent = np.arange(len(hashes))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in hamming_pairs(np.asarray(hashes), max_distance):
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)
    roots = np.array([find(i) for i in range(len(hashes))])
    _, group_ids = np.unique(roots, return_inverse=True)
    # Renumber by first appearance so ids are stable for a given file order.
    order = {}
    return np.array([order.setdefault(g, len(order)) for g in group_ids], dtype=np.int64)


@dataclass(frozen=True)
class DuplicateGroup:
    """A group of two or more near-identical images."""

    members: tuple[int, ...]
    labels: tuple[str, ...]

    @property
    def conflicting(self) -> bool:
        """True when the copies carry different labels."""
        return len(set(self.labels)) > 1


def duplicate_groups(group_ids: np.ndarray, labels: list[str]) -> list[DuplicateGroup]:
    """Every group with more than one member, largest first."""
    members: dict[int, list[int]] = {}
    for index, group in enumerate(group_ids):
        members.setdefault(int(group), []).append(index)
    groups = [
        DuplicateGroup(tuple(m), tuple(labels[i] for i in m)) for m in members.values() if len(m) > 1
    ]
    return sorted(groups, key=lambda g: (-len(g.members), g.members[0]))
