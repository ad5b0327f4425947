"""Near-duplicate images by perceptual hash (``imagehash.phash``: 64 bits from the low frequencies of a 32x32
grey version of the picture), so resized, recompressed or slightly edited copies hash alike.

:func:`perceptual_hashes` hashes each image from a small preview (the hash only reads 32x32 pixels);
:func:`near_duplicate_pairs` lists the pairs whose hashes differ in at most ``max_distance`` bits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from sd_scripts.data.images import ImageProblem, load_preview

__all__ = ["perceptual_hash", "perceptual_hashes", "near_duplicate_pairs", "HASH_BITS"]

HASH_BITS = 64
_PREVIEW_SIDE = 128


def perceptual_hash(path: str) -> int | None:
    """The 64-bit pHash of the image at ``path`` as an int; None when it cannot be decoded."""
    import imagehash

    try:
        preview = load_preview(path, _PREVIEW_SIDE)
    except ImageProblem:
        return None
    return int(str(imagehash.phash(preview)), 16)


def perceptual_hashes(paths: Sequence[str], progress: Callable[[int, int], None] | None = None) -> list[int | None]:
    """:func:`perceptual_hash` of every path, in order (two threads: decoding releases the GIL)."""
    out: list[int | None] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for value in pool.map(perceptual_hash, paths):
            out.append(value)
            if progress is not None:
                progress(len(out), len(paths))
    return out


def near_duplicate_pairs(hashes: Sequence[int | None], max_distance: int) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for every pair ``i < j`` whose hashes differ in at most ``max_distance`` bits, closest
    first (then in index order). Missing hashes (None) pair with nothing."""
    known = [(i, h) for i, h in enumerate(hashes) if h is not None]
    if len(known) < 2 or max_distance < 0:
        return []
    index = np.array([i for i, _ in known], dtype=np.int64)
    values = np.array([h for _, h in known], dtype=np.uint64)
    pairs = []
    for a in range(len(values) - 1):
        distances = np.bitwise_count(values[a + 1:] ^ values[a])
        for b in np.nonzero(distances <= max_distance)[0]:
            pairs.append((int(index[a]), int(index[a + 1 + b]), int(distances[b])))
    pairs.sort(key=lambda p: (p[2], p[0], p[1]))
    return pairs
