"""8-bit floating point (FP8): E4M3 (4 exponent bits, 3 mantissa bits, no infinities: the ``fn``
variant, largest magnitude 448) and E5M2 (largest 57344), the formats of current GPUs' FP8 tensor
cores (Micikevicius et al., *FP8 Formats for Deep Learning*, 2022).

A tensor is scaled so that its largest magnitude (per output channel for weights, per tensor for
activations, from calibration) lands on the format's largest value, then rounded to the nearest
representable number (round to nearest even, saturating: what ONNX ``QuantizeLinear`` does with
``saturate=1``). The grid is logarithmic: relative error about the same, 2**-4 at E4M3, for small
values and large, where an INT8 grid's relative error grows as values shrink. PyTorch's float8
dtypes hold the values; ONNX holds them as ``float8e4m3fn`` / ``float8e5m2`` tensors behind a
``DequantizeLinear`` (opset 19).

>>> import torch
>>> x = torch.tensor([0.001, 0.1, 1.0, 3.0])
>>> scale = fp8_scale(x.abs().max(), "fp8-e4m3")
>>> float(scale * 448)
3.0
>>> y = fake_fp8(x, scale, "fp8-e4m3")
>>> bool(((y - x).abs() / x).max() < 2 ** -4)  # relative error within half a mantissa step everywhere
True
>>> to_fp8(torch.tensor([1e6]), torch.tensor(1.0), "fp8-e4m3").float().item()  # saturates, never NaN
448.0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["FORMATS", "DTYPES", "fp8_max", "fp8_scale", "to_fp8", "fake_fp8", "FakeFP8", "DequantizeFP8",
           "is_fp8", "FP8_OPSET"]

DTYPES: dict[str, torch.dtype] = {"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}
FORMATS = tuple(DTYPES)
FP8_OPSET = 19  # the first opset whose QuantizeLinear / DequantizeLinear take float8 tensors


def fp8_max(fmt: str) -> float:
    """The largest finite value of ``fmt`` (448 for E4M3, 57344 for E5M2)."""
    return float(torch.finfo(DTYPES[fmt]).max)


def is_fp8(t: Tensor) -> bool:
    return t.dtype in DTYPES.values()


def fp8_scale(amax: Tensor, fmt: str) -> Tensor:
    """The scale that puts ``amax`` (a tensor of largest magnitudes) on the format's largest value;
    1 where ``amax`` is 0 (nothing to scale)."""
    a = torch.as_tensor(amax).detach().float()
    return torch.where(a > 0, a / fp8_max(fmt), torch.ones_like(a))


def to_fp8(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """``x / scale`` rounded to ``fmt`` (nearest even), saturating at its largest value."""
    m = fp8_max(fmt)
    return torch.clamp(x.float() / scale, -m, m).to(DTYPES[fmt])


def fake_fp8(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """``x`` on the scaled FP8 grid, back in ``x``'s dtype."""
    return (to_fp8(x, scale, fmt).float() * scale).to(x.dtype)


def _zero(g: Any, fmt: str) -> Any:
    """A float8 zero-point constant: its type tells ``QuantizeLinear`` the target format."""
    return g.op("Constant", value_t=torch.zeros((), dtype=DTYPES[fmt]))


class FakeFP8(torch.autograd.Function):
    """Per-tensor FP8 quantize-dequantize with a constant scale; straight-through gradient. Exports
    as ``QuantizeLinear -> DequantizeLinear`` with a float8 zero-point."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, fmt: str) -> Tensor:  # type: ignore[override]
        return fake_fp8(x, scale, fmt)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:  # type: ignore[override]
        return g, None, None

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, fmt: str) -> Any:
        zp = _zero(g, fmt)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


class DequantizeFP8(torch.autograd.Function):
    """FP8 weights ``q [out, ...]`` times their scale per output channel; exports as one
    ``DequantizeLinear(axis=0)`` of the float8 initializer."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, scale: Tensor, fmt: str) -> Tensor:  # type: ignore[override]
        return q.float() * scale.reshape([-1] + [1] * (q.dim() - 1))

    @staticmethod
    def symbolic(g: Any, q: Any, scale: Any, fmt: str) -> Any:
        return g.op("DequantizeLinear", q, scale, axis_i=0)  # no zero-point: the input's type says float8
