"""Random crop plus the 8 flips/90° rotations, one draw applied identically to every image of a pair."""

from __future__ import annotations

import numpy as np


def crop_pair(images: list[np.ndarray], patch: int, rng: np.random.Generator, augment: bool) -> list[np.ndarray]:
    """Same random patch x patch window of each BGR HxWx3 image, as RGB, then the same dihedral transform.

    Returns views (no copy); `np.stack` in the collate step makes them contiguous.
    """
    h, w = images[0].shape[:2]
    y, x = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
    turns, flip = (int(rng.integers(4)), bool(rng.integers(2))) if augment else (0, False)
    out = []
    for img in images:
        crop = img[y : y + patch, x : x + patch, ::-1]  # BGR -> RGB
        if flip:
            crop = crop[:, ::-1]
        out.append(np.rot90(crop, turns))
    return out
