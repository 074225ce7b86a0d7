"""The per-layer facts a report shows: how sensitive each layer of the original model is to weight
quantization, and what compression left of it (parameters, zero fraction, bit width).

>>> import torch
>>> torch.manual_seed(0) and None
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> rows = layer_table(m, m, [torch.randn(32, 8)])
>>> [(r["layer"], r["params"], r["bits"]) for r in rows]
[('0', 128, 'float'), ('2', 64, 'float')]
>>> rows[0]["sqnr_db"]["8"] > rows[0]["sqnr_db"]["4"]
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.core.batch import Batch, call, tensors_of

__all__ = ["layer_table"]


def _weight_count(m: nn.Module) -> tuple[int, int, str] | None:
    """(parameters, non-zero parameters, bits) of a weighted layer, float or quantized."""
    wq = getattr(m, "weight_q", None)  # quantized layers first: they are Linear/Conv subclasses too
    if isinstance(wq, torch.Tensor):
        return wq.numel(), int((wq != 0).sum()), str(getattr(m, "bits", 8))
    if hasattr(m, "packed") and hasattr(m, "in_features"):
        n = int(getattr(m, "in_features")) * int(getattr(m, "out_features"))  # noqa: B009
        return n, n, str(getattr(m, "bits"))  # noqa: B009
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
        w = m.weight.detach()
        return w.numel(), int((w != 0).sum()), "float"
    return None


@torch.no_grad()
def layer_table(original: nn.Module, final: nn.Module, batches: list[Batch], bits: tuple[int, ...] = (8, 4)) -> list[dict[str, Any]]:
    """One row per Linear/Conv of ``original``: its output SQNR (dB, on ``batches``) with only its
    weights quantized at each width of ``bits`` (per-channel, symmetric), and in ``final`` the
    parameters left under that name (factorized layers sum their parts), the fraction of them that
    are zero and the bit widths. ``original`` is changed temporarily and restored."""
    from slimkit.quant.mixed_precision import layer_noise, sqnr_db

    weighted = [n for n, m in original.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
    sqnr: dict[str, dict[str, float]] = {}
    if batches and weighted:
        original.eval()
        reference = [[t.detach().clone() for t in tensors_of(call(original, b))] for b in batches]
        noise = layer_noise(original, weighted, bits, batches, reference, lambda b: b)
        sqnr = {n: {str(b): sqnr_db(v) for b, v in per.items()} for n, per in noise.items()}
    after = {n: c for n, m in final.named_modules() if (c := _weight_count(m)) is not None}
    rows = []
    for name in weighted:
        orig = dict(original.named_modules())[name].weight.numel()
        parts = [c for n, c in after.items() if n == name or n.startswith(name + ".")]
        params = sum(c[0] for c in parts)
        nonzero = sum(c[1] for c in parts)
        rows.append({"layer": name, "original_params": orig, "params": params,
                     "sparsity": 1.0 - nonzero / orig if orig else 0.0,
                     "bits": ",".join(sorted({c[2] for c in parts})) or "removed",
                     "sqnr_db": sqnr.get(name, {})})
    return rows
