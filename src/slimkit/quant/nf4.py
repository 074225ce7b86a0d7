"""4-bit NormalFloat (NF4) weight-only Linear layers: QLoRA's non-uniform grid (Dettmers et al., 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", section 3).

A weight ``[out, in]`` is split along ``in`` into blocks of ``group_size`` (64 in the paper); each
block ``X`` is normalized into ``[-1, 1]`` by its absolute maximum (the quantization constant
``c = absmax(X)``, eq. 1 with the NF4 grid in place of the integers) and each value becomes the
index of the nearest of the 16 NormalFloat values ``q_i`` (eq. 4: estimates of the quantiles of
N(0, 1), scaled into ``[-1, 1]``, with an exact zero), chosen by the midpoints between neighbours
as bitsandbytes does. Dequantization is ``q[code] * c`` (eq. 2). For normally distributed weights
the levels are equally likely, so they carry more information than a uniform grid's.
Double quantization (the paper's 8-bit constants) is not applied: ``absmax`` is float32.

The codes are stored two to a byte (``weight_only.pack_nibbles``). ONNX Runtime has no NF4 kernel, so
the file is plain ONNX that keeps the bytes: BitShift splits them, ``Gather`` reads the codebook,
``Mul`` applies each block's absmax, then ``MatMul`` and ``Add`` in float (the runtime dequantizes).

>>> import torch
>>> w = torch.tensor([[0.1, -0.7, 0.35, 0.0], [1.0, 2.0, 3.0, 4.0]])
>>> codes, absmax = nf4_groups(w, group_size=2)
>>> codes.tolist(), absmax[1].tolist()
([[9, 0, 15, 7], [12, 15, 14, 15]], [2.0, 4.0])
>>> [round(v, 4) for v in dequantize_nf4(codes, absmax)[1].tolist()]  # 1/2 and 3/4 of each absmax, to the grid
[0.8814, 2.0, 2.8918, 4.0]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.dropin import DropIn, adopt
from slimkit.core.layers import in_own_layout
from slimkit.quant.weight_only import pack_nibbles, unpack_nibbles

__all__ = ["NF4", "nf4_groups", "dequantize_nf4", "dequant_stored", "QuantLinearNF4"]

# QLoRA's 16 NormalFloat-4 values, as bitsandbytes tabulates them (float32)
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
# the decision points between neighbouring values: a value on one goes to the lower code, as in bitsandbytes
_MIDPOINTS = ((NF4[1:].double() + NF4[:-1].double()) / 2).float()


def _blocks(w: Tensor, group_size: int) -> Tensor:
    out_f, in_f = w.shape
    if group_size < 2 or group_size % 2 or in_f % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input dimension {in_f} into blocks of an "
                         "even size; choose an even divisor of it (64 is QLoRA's)")
    return w.reshape(out_f, in_f // group_size, group_size)


def nf4_groups(w: Tensor, group_size: int, rows: int = 4096) -> tuple[Tensor, Tensor]:
    """NF4 codes ``[out, in]`` (uint8, 0-15) and each block's absmax ``[out, in // group_size]``
    (float32); ``rows`` rows at a time, so a large table's float temporaries are slices of it. An
    all-zero block has absmax 0 and every code on the grid's zero."""
    out_f, in_f = w.shape
    _blocks(w, group_size)  # the group size fits
    codes = torch.empty((out_f, in_f), dtype=torch.uint8, device=w.device)
    absmax = torch.empty((out_f, in_f // group_size), dtype=torch.float32, device=w.device)
    mids = _MIDPOINTS.to(w.device)
    for r in range(0, out_f, rows):  # a slice's copy at most (a transposed weight's rows are not contiguous)
        x = _blocks(w[r:r + rows].detach().float().contiguous(), group_size)  # [rows, groups, group_size]
        c = x.abs().amax(-1)
        normed = x / torch.where(c > 0, c, torch.ones_like(c))[..., None]  # eq. 1: into [-1, 1]
        codes[r:r + rows] = torch.bucketize(normed, mids).reshape(-1, in_f).to(torch.uint8)
        absmax[r:r + rows] = c
    return codes, absmax


def dequantize_nf4(codes: Tensor, absmax: Tensor, codebook: Tensor | None = None) -> Tensor:
    """The float32 weight ``[out, in]``: each code's NormalFloat value times its block's absmax (eq. 2)."""
    book = (NF4 if codebook is None else codebook).to(absmax.device, torch.float32)
    values = book[codes.long()].reshape(codes.shape[0], absmax.shape[1], -1)
    return (values * absmax[..., None]).reshape(codes.shape)


def _dequant_symbolic(g: Any, packed: Any, absmax: Any, codebook: Any) -> Any:
    """The ONNX of ``dequantize_nf4(unpack(packed))``: BitShift on the stored bytes first, which the
    exporter's constant folding leaves alone (a Cast first would fold the weight into a float
    initializer, ``weight_only._SplitStored``), then Gather, Mul by the absmax, Reshape."""
    rows, cols = packed.type().sizes()
    groups = absmax.type().sizes()[1]
    four = g.op("Constant", value_t=torch.tensor(4, dtype=torch.uint8))
    high = g.op("BitShift", packed, four, direction_s="RIGHT")
    low = g.op("BitShift", g.op("BitShift", packed, four, direction_s="LEFT"), four, direction_s="RIGHT")
    last = g.op("Constant", value_t=torch.tensor([-1]))
    pairs = g.op("Concat", g.op("Unsqueeze", low, last), g.op("Unsqueeze", high, last), axis_i=-1)
    values = g.op("Gather", codebook, g.op("Cast", pairs, to_i=7), axis_i=0)  # int64 indices: [rows, cols, 2]
    blocks = g.op("Reshape", values, g.op("Constant", value_t=torch.tensor([rows, groups, 2 * cols // groups])))
    scaled = g.op("Mul", blocks, g.op("Unsqueeze", absmax, last))
    return g.op("Reshape", scaled, g.op("Constant", value_t=torch.tensor([rows, 2 * cols])))


class _DequantNF4(torch.autograd.Function):
    """The float weight of stored NF4 bytes ``[out, in / 2]``; exported as plain ONNX (``_dequant_symbolic``)."""

    @staticmethod
    def forward(ctx: Any, packed: Tensor, absmax: Tensor, codebook: Tensor) -> Tensor:  # type: ignore[override]
        return dequantize_nf4(unpack_nibbles(packed, 2 * packed.shape[1]), absmax, codebook)

    @staticmethod
    def symbolic(g: Any, packed: Any, absmax: Any, codebook: Any) -> Any:
        return _dequant_symbolic(g, packed, absmax, codebook)


def dequant_stored(packed: Tensor, absmax: Tensor, codebook: Tensor) -> Tensor:
    """The float32 weight ``[rows, 2 * cols]`` of stored NF4 bytes ``[rows, cols]``, exported so that
    the file keeps the bytes (``_dequant_symbolic``)."""
    return _DequantNF4.apply(packed, absmax, codebook)


_ROWS = 4096  # output rows dequantized at a time by a wide layer's forward


class _LinearNF4(torch.autograd.Function):
    """``x @ W^T + b`` with W dequantized from NF4 bytes; exports as the dequantization, Transpose,
    MatMul and (with a bias) Add, all standard ONNX."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, packed: Tensor, absmax: Tensor, codebook: Tensor,  # type: ignore[override]
                bias: Tensor, has_bias: bool) -> Tensor:
        n = packed.shape[0]

        def rows(r: int, e: int) -> Tensor:  # output rows r..e of the weight, in x's dtype
            return _DequantNF4.forward(ctx, packed[r:e], absmax[r:e], codebook).to(x.dtype)

        b = bias.to(x.dtype) if has_bias else None
        if n <= _ROWS:
            return F.linear(x, rows(0, n), b)
        # a wide layer (an output head over 32000 tokens) a slice at a time: its float weight never whole
        return torch.cat([F.linear(x, rows(r, min(r + _ROWS, n)), None if b is None else b[r:r + _ROWS])
                          for r in range(0, n, _ROWS)], -1)

    @staticmethod
    def symbolic(g: Any, x: Any, packed: Any, absmax: Any, codebook: Any, bias: Any, has_bias: bool) -> Any:
        w = _dequant_symbolic(g, packed, absmax, codebook)
        y = g.op("MatMul", x, g.op("Transpose", w, perm_i=[1, 0]))
        return g.op("Add", y, bias) if has_bias else y


class QuantLinearNF4(DropIn, nn.Linear):
    """A Linear layer with NF4 weights in blocks of ``group_size``, each with its absmax (weight-only:
    activations stay float).

    Buffers: ``packed`` ``[out, in / 2]`` uint8 (two codes a byte, the first in the low nibble),
    ``absmax`` ``[out, in / group_size]`` float32, ``bias`` (zeros for a layer without one) and
    ``codebook``, the 16 NF4 values. ``grid`` takes codes and absmax chosen already (``nf4_groups``).

    >>> import torch
    >>> lin = torch.nn.Linear(128, 8)
    >>> q = QuantLinearNF4(lin, group_size=64)
    >>> isinstance(q, torch.nn.Linear), tuple(q.weight.shape), tuple(q.packed.shape), tuple(q.absmax.shape)
    (True, (8, 128), (8, 64), (8, 2))
    >>> err = (q.weight - lin.weight).abs()  # at most half the widest gap of the grid (-1.0 to -0.70)
    >>> bool((err <= 0.152 * q.absmax.repeat_interleave(64, 1)).all())
    True
    """

    fx_leaf = True  # torch.fx keeps it one call (core/graph.py)
    _torch_base = nn.Linear
    _layer_args = ("linear",)

    packed: Tensor
    absmax: Tensor
    bias: Tensor  # type: ignore[assignment]
    codebook: Tensor

    def __init__(self, linear: nn.Linear, group_size: int = 64, grid: tuple[Tensor, Tensor] | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the weight is held as codes
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        codes, absmax = grid if grid is not None else nf4_groups(linear.weight, group_size)
        _blocks(codes, group_size)  # the shapes agree with the group size
        self.register_buffer("packed", pack_nibbles(codes))
        self.register_buffer("absmax", absmax.float().clone())
        self.has_bias = linear.bias is not None
        b = linear.bias.detach().float().clone() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", b)
        self.register_buffer("codebook", NF4.clone())
        self.weight_dtype = linear.weight.dtype
        adopt(self, linear, skip=("weight", "bias"))

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        """The dequantized weight, in the original's dtype and layout (read-only); exported as plain
        ONNX (BitShift, Gather, Mul) for model code that reads it."""
        w = dequant_stored(self.packed, self.absmax, self.codebook).to(self.weight_dtype)
        return in_own_layout(self, w)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(f"{type(self).__name__} holds its weight as NF4 codes; it cannot be assigned")

    @property
    def export_error(self) -> str | None:
        """Why this layer cannot be exported (``export_onnx`` asks every module): never, it is plain ONNX."""
        return None

    def dequantized_weight(self) -> Tensor:
        """The weight as float32 ``[out, in]``."""
        return dequantize_nf4(unpack_nibbles(self.packed, self.in_features), self.absmax, self.codebook)

    def forward(self, x: Tensor) -> Tensor:
        return _LinearNF4.apply(x, self.packed, self.absmax, self.codebook, self.bias, self.has_bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, nf4, group_size={self.group_size}"
