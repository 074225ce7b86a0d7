"""Real photographs as model inputs: crops of scikit-learn's two bundled sample photos (a temple in
China and a flower, 427 x 640), which install offline with scikit-learn.

Calibration and evaluation crops never coincide: ``photo_crops(split="calibration")`` takes squares
of 40-60% of the photo's height, ``split="evaluation"`` squares of 65-95%, at positions drawn
from separate seeds, each resized (bilinear) to ``size`` and returned as RGB in ``[0, 255]``.

>>> x = photo_crops(4, size=32, split="calibration")
>>> tuple(x.shape), float(x.min()) >= 0.0, float(x.max()) <= 255.0
((4, 3, 32, 32), True, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["photo_crops"]

_SCALES = {"calibration": (0.40, 0.60, 1), "evaluation": (0.65, 0.95, 2)}


def photo_crops(n: int, size: int = 240, split: str = "calibration") -> Tensor:
    """``n`` square crops ``[n, 3, size, size]`` (float, RGB in ``[0, 255]``), alternating between
    the two photos."""
    if split not in _SCALES:
        raise ValueError(f"split is 'calibration' or 'evaluation', got {split!r}")
    if n < 1 or size < 8:
        raise ValueError(f"need at least one crop of at least 8 pixels; got n={n}, size={size}")
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(p.copy()).permute(2, 0, 1).float() for p in load_sample_images().images]
    lo, hi, seed = _SCALES[split]
    g = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[1:]
        side = int(h * (lo + (hi - lo) * float(torch.rand((), generator=g))))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = img[:, top:top + side, left:left + side][None]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(crops).clamp(0, 255)
