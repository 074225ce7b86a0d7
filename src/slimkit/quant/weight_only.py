"""Group-wise weight-only quantization of Linear layers (INT4 and below), stored packed and exported
as ONNX Runtime's ``com.microsoft::MatMulNBits``, so the file really holds 4-bit weights.

A weight ``[out, in]`` is split along ``in`` into groups of ``group_size``; each group has its own
scale and zero-point. Values are unsigned ``b``-bit integers ``q`` with ``w = (q - zp) * scale``;
symmetric groups have ``zp = 2**(b-1)`` (the signed range [-8, 7] at 4 bits), asymmetric ones
cover the group's ``[min, max]``. A symmetric group's scale is signed, so that its value of largest
magnitude, whichever its sign, maps to -8 and the grid's 16 levels are all used (the value of
opposite sign at the same magnitude, if any, clips by one step), as ONNX Runtime's quantizer does. Two 4-bit values share a byte, the first in the low nibble, as
MatMulNBits reads them.

>>> import torch
>>> w = torch.tensor([[0.1, -0.7, 0.35, 0.0], [1.0, 2.0, 3.0, 4.0]])
>>> scale, zp = group_qparams(w, bits=4, group_size=2, symmetric=False)
>>> q = quantize_groups(w, scale, zp, bits=4)
>>> q.tolist(), zp.tolist()
([[15, 0, 15, 0], [7, 15, 11, 15]], [[13.0, 0.0], [0.0, 0.0]])
>>> bool(((dequantize_groups(q, scale, zp) - w).abs() <= scale.repeat_interleave(2, 1) / 2 + 1e-6).all())
True
>>> unpack_nibbles(pack_nibbles(q), 4).tolist() == q.tolist()
True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.dropin import DropIn, adopt
from slimkit.core.layers import in_own_layout
from slimkit.quant.modules import ScaleInput

__all__ = ["group_qparams", "quantize_groups", "dequantize_groups", "rtn_groups", "pack_nibbles", "unpack_nibbles", "split_stored",
           "QuantLinearNBits", "QuantEmbedding", "EXPORT_BITS"]

EXPORT_BITS = (4,)  # the widths MatMulNBits runs on the CPU in the ONNX Runtime this project pins


def _groups(w: Tensor, group_size: int) -> Tensor:
    out_f, in_f = w.shape
    if group_size <= 0 or in_f % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input dimension {in_f}; "
                         "choose a divisor of it (32, 64 and 128 are usual)")
    return w.reshape(out_f, in_f // group_size, group_size)


def group_qparams(w: Tensor, bits: int, group_size: int, symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """Scale and zero-point per group, each ``[out, in // group_size]``."""
    g = _groups(w.detach().float(), group_size)
    qmax = 2**bits - 1
    if symmetric:  # the value of largest magnitude lands exactly on -2**(b-1): all 16 levels are used
        half = 2 ** (bits - 1)
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scale = extreme / -half  # negative when the extreme is positive, as ONNX Runtime's own 4-bit quantizer does
        zp = torch.full_like(scale, half)
    else:
        lo = g.amin(-1).clamp(max=0.0)
        hi = g.amax(-1).clamp(min=0.0)
        scale = (hi - lo) / qmax
        zp = torch.clamp(torch.round(-lo / scale.clamp_min(1e-12)), 0, qmax) + 0.0  # no -0.0
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    return scale, zp


def quantize_groups(w: Tensor, scale: Tensor, zp: Tensor, bits: int, rows: int = 4096) -> Tensor:
    """Round ``w`` to the groups' grids: unsigned integers in ``[0, 2**bits - 1]`` (uint8); ``rows``
    rows at a time, so a large table's float temporaries are slices of it."""
    if w.shape[0] > rows:
        q = torch.empty(w.shape, dtype=torch.uint8)
        for r in range(0, w.shape[0], rows):
            q[r:r + rows] = quantize_groups(w[r:r + rows], scale[r:r + rows], zp[r:r + rows], bits, rows)
        return q
    g = _groups(w.detach().float(), w.shape[1] // scale.shape[1])
    q = torch.clamp(torch.round(g / scale[..., None]) + zp[..., None], 0, 2**bits - 1)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize_groups(q: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
    g = q.float().reshape(q.shape[0], scale.shape[1], -1)
    return ((g - zp[..., None]) * scale[..., None]).reshape(q.shape)


def rtn_groups(w: Tensor, bits: int, group_size: int, symmetric: bool = True,
               rows: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """Round to nearest: ``(q, scale, zp)``; ``rows`` rows at a time (each row's own grid), so a large
    table's float temporaries are slices of it."""
    if w.shape[0] > rows:
        out: list[Tensor] = []
        for r in range(0, w.shape[0], rows):  # each slice written into the whole: no list of parts beside it
            part = rtn_groups(w[r:r + rows], bits, group_size, symmetric, rows)
            if not out:
                out = [torch.empty((w.shape[0], *p.shape[1:]), dtype=p.dtype) for p in part]
            for whole, p in zip(out, part, strict=True):
                whole[r:r + rows] = p
        return out[0], out[1], out[2]
    scale, zp = group_qparams(w, bits, group_size, symmetric)
    return quantize_groups(w, scale, zp, bits), scale, zp


def pack_nibbles(q: Tensor) -> Tensor:
    """Pack 4-bit values two to a byte along the last axis (first value in the low nibble); an odd
    length is padded with a zero."""
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """The first ``n`` 4-bit values of each row packed by ``pack_nibbles``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], -1).reshape(*packed.shape[:-1], -1)[..., :n]


def split_nibbles(packed: Tensor) -> Tensor:
    """``unpack_nibbles`` in float arithmetic (Div, Floor; an integer floor division or a bitwise
    AND exports as a longer chain, or not at all): every value of each row, as float."""
    p = packed.float()
    high = torch.floor(p / 16)
    return torch.stack([p - 16 * high, high], -1).reshape(*packed.shape[:-1], -1)


class _SplitStored(torch.autograd.Function):
    """``split_nibbles`` of a stored (constant) byte tensor ``[rows, cols]``. Exported with BitShift
    on the bytes first, which the exporter's constant folding leaves alone: a Cast or Div first
    would be folded into a float copy of the weight, and the file would hold it instead of the bytes."""

    @staticmethod
    def forward(ctx: Any, packed: Tensor) -> Tensor:  # type: ignore[override]
        return split_nibbles(packed)

    @staticmethod
    def symbolic(g: Any, packed: Any) -> Any:
        rows, cols = packed.type().sizes()
        four = g.op("Constant", value_t=torch.tensor(4, dtype=torch.uint8))
        high = g.op("BitShift", packed, four, direction_s="RIGHT")
        low = g.op("BitShift", g.op("BitShift", packed, four, direction_s="LEFT"), four, direction_s="RIGHT")
        last = g.op("Constant", value_t=torch.tensor([-1]))
        pairs = g.op("Concat", g.op("Unsqueeze", g.op("Cast", low, to_i=1), last),
                     g.op("Unsqueeze", g.op("Cast", high, to_i=1), last), axis_i=-1)
        return g.op("Reshape", pairs, g.op("Constant", value_t=torch.tensor([rows, 2 * cols])))


def split_stored(packed: Tensor) -> Tensor:
    """``split_nibbles`` of a stored byte tensor ``[rows, cols]``: every value, as float; exported
    so that the file keeps the bytes (``_SplitStored``)."""
    return _SplitStored.apply(packed)


_ROWS = 4096  # output rows dequantized at a time by a wide layer's forward


class _MatMulNBits(torch.autograd.Function):
    """``x @ W^T + b`` with W dequantized from packed groups; exports as MatMulNBits + Add."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, packed: Tensor, scales: Tensor, zp_packed: Tensor, bias: Tensor,  # type: ignore[override]
                meta: dict[str, int]) -> Tensor:
        n, k, gs = meta["N"], meta["K"], meta["block_size"]
        packed, scales, zp_packed = packed.reshape(n, -1), scales.reshape(n, -1), zp_packed.reshape(n, -1)

        def rows(r: int, e: int) -> Tensor:  # output rows r..e of the weight, in float
            zp = unpack_nibbles(zp_packed[r:e], k // gs).float()
            return dequantize_groups(unpack_nibbles(packed[r:e], k), scales[r:e], zp)

        if n <= _ROWS:
            return F.linear(x, rows(0, n), bias)
        # a wide layer (an output head over 32000 tokens) a slice at a time: its float weight never whole
        return torch.cat([F.linear(x, rows(r, min(r + _ROWS, n)), bias[r:r + _ROWS]) for r in range(0, n, _ROWS)], -1)

    @staticmethod
    def symbolic(g: Any, x: Any, packed: Any, scales: Any, zp_packed: Any, bias: Any, meta: dict[str, int]) -> Any:
        level = {"accuracy_level_i": meta["accuracy_level"]} if meta.get("accuracy_level") is not None else {}
        # symmetric groups' zero-point is MatMulNBits' default (2**(bits-1)), and a layer without a bias
        # adds nothing: both inputs are left out, as ONNX Runtime's own quantizer leaves them
        inputs = [x, packed, scales] + ([] if meta.get("default_zero_point") else [zp_packed])
        y = g.op("com.microsoft::MatMulNBits", *inputs, K_i=meta["K"], N_i=meta["N"],
                 bits_i=meta["bits"], block_size_i=meta["block_size"], **level)
        return g.op("Add", y, bias) if meta.get("bias", 1) else y


class QuantLinearNBits(DropIn, nn.Linear):
    """A Linear layer with group-wise ``bits``-bit weights (weight-only: activations stay float).

    Built by rounding to nearest, or from integers an algorithm chose (``q``, ``scale``, ``zp``
    from GPTQ). Buffers: ``packed`` ``[out, groups, group_size / 2]`` uint8, ``scales``
    ``[out * groups]``, ``zero_points`` packed ``[out, ceil(groups / 2)]`` uint8 (the layout
    MatMulNBits takes), ``bias``, and ``input_scale`` (AWQ's per-input-channel scales: the weights
    were scaled up by them, the input is divided by them; all ones otherwise, and then not exported).
    """

    fx_leaf = True  # torch.fx keeps it one call (core/graph.py)
    _torch_base = nn.Linear
    _layer_args = ("linear",)

    packed: Tensor
    scales: Tensor
    zero_points: Tensor
    bias: Tensor  # type: ignore[assignment]
    input_scale: Tensor

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                 grid: tuple[Tensor, Tensor, Tensor] | None = None, input_scale: Tensor | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the weight is held packed
        if bits not in (2, 3, 4):
            raise ValueError(f"group-wise weights are 2, 3 or 4 bits (half bytes); got weight_bits={bits}")
        if group_size < 16 or group_size & (group_size - 1):
            raise ValueError(f"MatMulNBits needs a group size that is a power of two, at least 16; got {group_size}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        q, scale, zp = grid if grid is not None else rtn_groups(linear.weight, bits, group_size, symmetric)
        groups = self.in_features // group_size
        self.register_buffer("packed", pack_nibbles(q.reshape(self.out_features, groups, group_size)))
        self.register_buffer("scales", scale.float().reshape(-1).clone())
        self.register_buffer("zero_points", pack_nibbles(zp.to(torch.uint8).reshape(self.out_features, groups)))
        b = linear.bias.detach().float().clone() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", b)
        s = input_scale.detach().float().reshape(-1) if input_scale is not None else torch.ones(self.in_features)
        if s.numel() != self.in_features or not bool((s > 0).all()):
            raise ValueError(f"input_scale must hold {self.in_features} positive values")
        self.register_buffer("input_scale", s.clone())
        self.weight_dtype = linear.weight.dtype
        adopt(self, linear, skip=("weight", "bias"))

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        """The dequantized weight, in the original's dtype and layout (read-only). Model code that
        reads it (``nn.MultiheadAttention`` reads ``out_proj.weight``) exports it as plain ONNX: the
        nibbles are split in float (Div, Floor), which any exporter and runtime take."""
        q = split_stored(self.packed.reshape(self.out_features, -1))[..., :self.in_features]
        zp = split_stored(self.zero_points)[..., :self.in_features // self.group_size]
        w = dequantize_groups(q, self.scales.reshape(self.out_features, -1), zp)
        if not bool((self.input_scale == 1).all()):  # AWQ: the input is divided by the scales the weights carry
            w = w / self.input_scale
        w = w.to(self.weight_dtype)
        return in_own_layout(self, w)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(f"{type(self).__name__} holds its weight packed; it cannot be assigned")

    # MatMulNBits' accuracy_level in the exported file: None leaves it unset (float compute); 4
    # multiplies int8-quantized activations by the unpacked weights. Set per export (``export/generative.py``
    # sets 4 for decoding, where each step reads every weight once: 1.6x the tokens per second of float
    # compute on a 125 M Llama, benchmarks/results/llm_generate.md), never saved.
    export_accuracy_level: int | None = None
    # True while exporting for a runtime without MatMulNBits (``export_onnx(target="tvm")``): the layer
    # is written as its ``weight`` (the 4-bit codes kept as bytes, split by BitShift) times the input,
    # plain ONNX any runtime takes; set per export, never saved
    export_standard: bool = False

    def meta(self) -> dict[str, int]:
        meta = {"N": self.out_features, "K": self.in_features, "bits": self.bits, "block_size": self.group_size,
                "bias": int(bool(self.bias.any())),
                "default_zero_point": int(self.symmetric and bool(
                    (unpack_nibbles(self.zero_points, self.in_features // self.group_size) == 2 ** (self.bits - 1)).all()))}
        if self.export_accuracy_level is not None:
            meta["accuracy_level"] = self.export_accuracy_level
        return meta

    @property
    def export_error(self) -> str | None:
        """Why this layer cannot be exported (``export_onnx`` asks every module), or None."""
        if self.bits in EXPORT_BITS:
            return None
        return (f"{self.bits}-bit group-wise weights are not exported: slimkit writes MatMulNBits at "
                f"{' and '.join(map(str, EXPORT_BITS))} bits (ONNX Runtime's CPU kernel has no 3-bit form, and "
                "the 2-bit packing is not written); quantize with weight_bits=4 to export")

    def dequantized_weight(self) -> Tensor:
        q = unpack_nibbles(self.packed.reshape(self.out_features, -1), self.in_features)
        zp = unpack_nibbles(self.zero_points, self.in_features // self.group_size).float()
        return dequantize_groups(q, self.scales.reshape(self.out_features, -1), zp)

    def forward(self, x: Tensor) -> Tensor:
        if self.export_standard and torch.onnx.is_in_onnx_export():
            return F.linear(x, self.weight, self.bias if bool(self.bias.any()) else None)
        if not bool((self.input_scale == 1).all()):  # decided on the buffer's values, also when exporting
            x = ScaleInput.apply(x, 1.0 / self.input_scale)
        return _MatMulNBits.apply(x, self.packed, self.scales, self.zero_points, self.bias, self.meta())

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}")


class _GatherRows(torch.autograd.Function):
    """Rows of an int8 table times their scales; exports as Gather, Cast, Gather, Unsqueeze, Mul."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, table: Tensor, scales: Tensor) -> Tensor:  # type: ignore[override]
        return table[ids].float() * scales[ids].unsqueeze(-1)

    @staticmethod
    def symbolic(g: Any, ids: Any, table: Any, scales: Any) -> Any:
        rows = g.op("Cast", g.op("Gather", table, ids, axis_i=0), to_i=1)
        s = g.op("Unsqueeze", g.op("Gather", scales, ids, axis_i=0), g.op("Constant", value_t=torch.tensor([-1])))
        return g.op("Mul", rows, s)


class QuantEmbedding(DropIn, nn.Embedding):
    """An embedding table stored as integers, so the exported file holds 1 byte per value (int8,
    one symmetric scale per row) or half a byte (``bits=4``: groups of ``group_size`` along each
    row, each with a scale and a zero-point, two values per byte) instead of 4; a lookup
    dequantizes only the rows it reads. The 4-bit lookup is plain ONNX (Gather, Cast, Div, Floor
    and Mul to split the bytes), so any runtime runs it.

    >>> import torch
    >>> e = torch.nn.Embedding(10, 64)
    >>> q, q4 = QuantEmbedding(e), QuantEmbedding(e, bits=4, group_size=32)
    >>> ids = torch.tensor([[1, 2, 9]])
    >>> bool((q(ids) - e(ids)).abs().max() <= q.scales.max() / 2 + 1e-7)
    True
    >>> bool((q4(ids) - e(ids)).abs().max() <= q4.scales.abs().max() / 2 + 1e-6), q4.table.shape
    (True, torch.Size([10, 32]))
    """

    fx_leaf = True  # torch.fx keeps it one call (core/graph.py)
    _torch_base = nn.Embedding
    _layer_args = ("embedding",)

    table: Tensor
    scales: Tensor
    zero_points: Tensor

    def __init__(self, embedding: nn.Embedding, bits: int = 8, group_size: int = 32) -> None:
        nn.Module.__init__(self)  # not nn.Embedding's: the table is held as integers
        if embedding.max_norm is not None:
            raise ValueError("an embedding with max_norm renormalizes rows at lookup time; it is kept in float")
        if bits not in (4, 8):
            raise ValueError(f"embedding tables are stored as 8 or 4 bits, got {bits}")
        w = embedding.weight.detach().float()
        self.num_embeddings, self.embedding_dim = w.shape
        self.bits, self.group_size = bits, group_size
        self.weight_dtype = embedding.weight.dtype
        if bits == 4:
            q, scale, zp = rtn_groups(w, 4, group_size, symmetric=False)  # the group size must divide the width
            self.register_buffer("table", pack_nibbles(q))
            self.register_buffer("scales", scale.float())
            self.register_buffer("zero_points", zp.to(torch.uint8))
        else:
            scale = torch.maximum(w.amax(1), -w.amin(1)) / 127.0  # |w|'s row maxima, without a copy of |w|
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            table = torch.empty(w.shape, dtype=torch.int8, device=w.device)
            for r in range(0, w.shape[0], 4096):  # a slice at a time: a large table's temporaries stay small
                table[r:r + 4096] = torch.clamp(torch.round(w[r:r + 4096] / scale[r:r + 4096, None]), -127, 127)
            self.register_buffer("table", table)
            self.register_buffer("scales", scale)
        adopt(self, embedding, skip=("weight",))

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        """The whole dequantized table (read-only); a lookup dequantizes only the rows it reads."""
        return self.forward_rows(torch.arange(self.num_embeddings, device=self.table.device)).to(self.weight_dtype)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(f"{type(self).__name__} holds its table as integers; it cannot be assigned")

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        return self.forward_rows(ids)

    def forward_rows(self, ids: Tensor) -> Tensor:
        """The rows ``ids`` of the table, dequantized."""
        if self.bits == 8:
            return _GatherRows.apply(ids, self.table, self.scales)
        # Gather rows of a flat id list, split the nibbles in float (Div, Floor; an integer floor
        # division exports as a sign-correcting chain of Mod, Xor, Where...), reshape with constant
        # shapes and restore the ids' shape once at the end: fewer nodes for ONNX Runtime to run
        flat = ids.reshape(-1)
        q = split_nibbles(self.table[flat]).reshape(-1, self.embedding_dim // self.group_size, self.group_size)
        zp, scale = self.zero_points[flat].float().unsqueeze(-1), self.scales[flat].unsqueeze(-1)
        return ((q - zp) * scale).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        kind = "int8 per row" if self.bits == 8 else f"uint4 in groups of {self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {kind}"
