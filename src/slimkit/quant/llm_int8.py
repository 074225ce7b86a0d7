"""Mixed-precision decomposition (Dettmers et al. 2022, "LLM.int8()"): a transformer's Linear
inputs carry a few feature channels tens of times larger than the rest (all-MiniLM-L6-v2: one
channel of the FFN output projection's input reaches 25 where the next reaches 6). A per-tensor INT8
grid sized for them is too coarse for everything else. Take those channels out of the INT8 product
and multiply them in float:

    x @ W^T  =  int8(x * m) @ int8(W * m)^T  +  x[:, O] @ W[:, O]^T,   m = 0 on the outlier set O

The paper picks ``O`` by an absolute threshold (|x| >= 6) at run time; here ``O`` is fixed from the
calibration data, relative to the layer's own scale (channels whose max |x| exceeds ``threshold``
times the median channel's), so the exported graph is static: a Gather of a handful of columns and
one small float MatMul beside the integer one.

>>> import torch
>>> absmax = torch.tensor([1.0, 1.2, 0.9, 25.0, 1.1, 7.0])
>>> outlier_channels(absmax, threshold=5.0).tolist()
[3, 5]
>>> outlier_channels(absmax, threshold=5.0, max_channels=1).tolist()
[3]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["outlier_channels"]


def outlier_channels(act_absmax: Tensor, threshold: float, max_channels: int = 8) -> Tensor:
    """Indices (ascending) of the input channels whose max ``|x|`` exceeds ``threshold`` times the
    median channel's, at most ``max_channels`` of them (the largest)."""
    if threshold <= 1.0:
        raise ValueError(f"the outlier threshold is a multiple of the median channel's range, > 1; got {threshold}")
    a = act_absmax.detach().float().reshape(-1)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("the activation statistics hold NaN or inf")
    median = a.median()
    if median <= 0:
        return torch.empty(0, dtype=torch.long)
    over = torch.nonzero(a > threshold * median).flatten()
    if over.numel() > max_channels:
        over = over[a[over].argsort(descending=True)[:max_channels]]
    return over.sort().values
