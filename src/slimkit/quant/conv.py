"""Quantized ``nn.Conv1d`` / ``nn.Conv2d``: integer weights, and in dynamic mode a run-time
quantized input into ``ConvInteger`` (see ``modules.py`` for the shared part and the exported forms)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.dropin import adopt
from slimkit.quant.modules import _QuantWeighted, _unsigned, dynamic_qparams

__all__ = ["QuantConv", "QuantConv1d", "QuantConv2d", "numeric_padding"]


class _DynamicConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, wq: Tensor, ws: Tensor, bias: Tensor, conv: dict[str, Any], unsigned: bool
    ) -> Tensor:
        s, z = dynamic_qparams(x)
        xq = torch.clamp(torch.round(x / s) + z, 0, 255)
        acc = F.conv2d(F.pad(xq - z, _pads(conv)), wq.float(), None, conv["stride"], 0,
                       conv["dilation"], conv["groups"])
        return acc * (s * ws).reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)

    @staticmethod
    def symbolic(g: Any, x: Any, wq: Any, ws: Any, bias: Any, conv: dict[str, Any], unsigned: bool) -> Any:
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        p = conv["padding"]
        operands = [_unsigned(g, wq), xz, g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))] \
            if unsigned else [wq, xz]  # as in _DynamicMatmul: 8-bit weights as uint8, zero-point 128
        acc = g.op("ConvInteger", xq, *operands, strides_i=list(conv["stride"]),
                   pads_i=[p[0], p[1], p[0], p[1]], dilations_i=list(conv["dilation"]),
                   group_i=conv["groups"])
        shape = g.op("Constant", value_t=torch.tensor([1, -1, 1, 1]))
        scale = g.op("Reshape", g.op("Mul", xs, ws), shape)
        y = g.op("Mul", g.op("Cast", acc, to_i=1), scale)
        return g.op("Add", y, g.op("Reshape", bias, shape))


def _pads(conv: dict[str, Any]) -> tuple[int, int, int, int]:
    ph, pw = conv["padding"]
    return (pw, pw, ph, ph)


class QuantConv(_QuantWeighted):
    """Quantized ``nn.Conv1d``/``nn.Conv2d`` with zero padding (numbers, ``'valid'``, or ``'same'``
    where it pads evenly). ``QuantConv(conv)`` gives a ``QuantConv1d`` or ``QuantConv2d``."""

    @classmethod
    def _class_for(cls, layer: nn.Module) -> type:
        if cls is QuantConv:
            impl: type[QuantConv] = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantConv1d
            return impl._class_for(layer)
        return super()._class_for(layer)

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, bits: int = 8, narrow: bool = True,
                 dynamic: bool = False, per_channel: bool = True, scale: Tensor | None = None,
                 fmt: str = "int") -> None:
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
            raise ValueError(f"QuantConv takes nn.Conv1d or nn.Conv2d, not {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv supports zero padding, not padding_mode={conv.padding_mode!r}")
        if dynamic and not isinstance(conv, nn.Conv2d):
            raise ValueError("dynamic quantization supports Conv2d only")
        padding = numeric_padding(conv)
        super().__init__(conv.weight, conv.bias, bits, narrow, dynamic, per_channel, scale, fmt)
        self.dims = conv.weight.dim() - 2
        self.conv: dict[str, Any] = {"stride": tuple(conv.stride), "padding": padding,
                                     "dilation": tuple(conv.dilation), "groups": conv.groups}
        adopt(self, conv, skip=("weight", "bias"))

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        if self.dynamic:
            return _DynamicConv.apply(x, self.weight_q, self.weight_scale, self.bias, c, self.bits == 8)
        fn = F.conv2d if self.dims == 2 else F.conv1d
        return fn(self.quantized_input(x), self.dequantized_weight(), self.effective_bias(), c["stride"], c["padding"],
                  c["dilation"], c["groups"])

    def extra_repr(self) -> str:
        w = self.weight_q.shape
        kind = f"bits={self.bits}" if self.fmt == "int" else self.fmt
        return f"{w[1] * self.conv['groups']}, {w[0]}, kernel={tuple(w[2:])}, {kind}, {self.conv}"


class QuantConv1d(QuantConv, nn.Conv1d):  # type: ignore[misc]
    """A quantized ``nn.Conv1d`` (see ``QuantConv``)."""

    _torch_base = nn.Conv1d


class QuantConv2d(QuantConv, nn.Conv2d):  # type: ignore[misc]
    """A quantized ``nn.Conv2d`` (see ``QuantConv``)."""

    _torch_base = nn.Conv2d


def numeric_padding(conv: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """A conv's zero padding as numbers per spatial axis: ``'valid'`` is none, ``'same'`` is
    ``dilation * (kernel - 1) / 2`` on each side where that is whole (stride 1, as torch requires)."""
    if not isinstance(conv.padding, str):
        return tuple(int(p) for p in conv.padding)
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' with kernel {tuple(conv.kernel_size)} pads unevenly (one more on one "
                         "side), which the integer convolution cannot express")
    return tuple(t // 2 for t in total)
