"""A conv layer's output at sampled positions, as a matrix product on its input patches: what makes
AdaRound's hundreds of steps per layer affordable on a CNN (the reconstruction loss is a mean over output
positions; a few thousand sampled ones estimate it, where every step would otherwise run the conv
on every calibration image at full resolution).

A dense conv (``groups=1``) at one output position is ``patch @ W.reshape(out, -1).T``; a depthwise
one is a per-channel dot product of the channel's ``k x k`` patch with its filter.

>>> import torch
>>> conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
>>> x = torch.randn(2, 3, 8, 8)
>>> forward, rows = conv_patches(conv, [x], per_image=64, seed=0)  # every position of both images
>>> y = forward(rows[0], conv.weight)
>>> full = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
>>> bool(torch.allclose(y.sort(0).values, full.sort(0).values, atol=1e-5))
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv_patches"]


def _pads(conv: nn.Conv2d) -> tuple[int, int] | None:
    if conv.padding_mode != "zeros":
        return None
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        k, d = conv.kernel_size, conv.dilation
        if any(s != 1 for s in conv.stride) or any((d[i] * (k[i] - 1)) % 2 for i in range(2)):
            return None  # 'same' with an uneven split: not one symmetric pad
        return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def conv_patches(conv: nn.Module, xs: list[Tensor], per_image: int = 256, batch_rows: int = 1024, seed: int = 0
                 ) -> tuple[Callable[[Tensor, Tensor], Tensor], list[Tensor]] | None:
    """``(forward, inputs)`` for a Conv2d on its calibration inputs ``xs``: ``per_image`` output
    positions sampled from each image, their patches shuffled into mini-batches of ``batch_rows``,
    and ``forward(patches, weight)`` the layer's output there (no bias). None for the convs it does
    not cover (grouped but not depthwise, channel multipliers, padding other than zeros)."""
    if not isinstance(conv, nn.Conv2d):
        return None
    pads = _pads(conv)
    c_in, c_out, g = conv.in_channels, conv.out_channels, conv.groups
    depthwise = g > 1 and g == c_in == c_out
    if pads is None or g > 1 and not depthwise:
        return None
    gen = torch.Generator().manual_seed(seed)
    rows: list[Tensor] = []
    for x in xs:
        for img in x.float():
            p = F.unfold(img[None], conv.kernel_size, conv.dilation, pads, conv.stride)[0]  # [c_in * k * k, L]
            pick = torch.randperm(p.shape[1], generator=gen)[:per_image]
            rows.append(p[:, pick].t())  # [n, c_in * k * k], channel-major as the weight is
    pool = torch.cat(rows)
    pool = pool[torch.randperm(len(pool), generator=gen)]
    if depthwise:
        pool = pool.reshape(len(pool), c_in, -1)  # [n, c, k * k]
    inputs = list(pool.split(batch_rows))

    def dense(p: Tensor, w: Tensor) -> Tensor:
        return p @ w.reshape(c_out, -1).t()

    def per_channel(p: Tensor, w: Tensor) -> Tensor:
        return (p * w.reshape(c_out, -1)).sum(-1)

    return (per_channel if depthwise else dense), inputs
