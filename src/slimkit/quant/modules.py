"""Quantized modules: what a PTQ plan is applied as, in PyTorch, and what export lowers to ONNX.

- ``ActQuant`` observes activations during calibration, then fake-quantizes with frozen qparams.
  It exports as ``QuantizeLinear -> DequantizeLinear``.
- ``QuantLinear`` / ``QuantConv`` hold integer weights (and, once the input scale is known, an
  int32 bias with scale ``s_x * s_w`` as integer kernels expect). They export as
  ``DequantizeLinear(int8 initializer)`` feeding a float ``Gemm``/``Conv``, which ONNX Runtime
  fuses with the surrounding Q/DQ into ``QLinearConv``/``QGemm``. In dynamic mode they quantize
  their input at run time and export as ``DynamicQuantizeLinear -> MatMulInteger/ConvInteger``.

Every forward computes in float exactly the numbers the integer kernels produce (up to float
summation order and rounding ties), which is what the export parity check relies on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.affine import choose_qparams, qrange, quantize
from slimkit.core.dropin import DropIn, adopt
from slimkit.core.layers import in_own_layout
from slimkit.quant.calibrators import Observer
from slimkit.quant.fp8 import DequantizeFP8, FakeFP8, fp8_scale, to_fp8

__all__ = ["WEIGHTED_LAYERS", "ActQuant", "ScaleInput", "QuantLinear", "QuantConv", "QuantConv1d", "QuantConv2d",
           "numeric_padding", "dynamic_qparams", "weight_qparams", "fake_quant_weight"]


WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the float layers slimkit quantizes


class _QDQ(torch.autograd.Function):
    """Per-tensor quantize-dequantize with constant qparams; straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:  # type: ignore[override]
        z = zp.to(x.dtype)
        q = torch.clamp(torch.round(x * (1.0 / scale)) + z, qmin, qmax)
        return (q - z) * scale

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:  # type: ignore[override]
        return g, None, None, None, None

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zp: Any, qmin: int, qmax: int) -> Any:
        q = g.op("QuantizeLinear", x, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp)


class _DQ(torch.autograd.Function):
    """Dequantize an integer initializer (weights per output channel, int32 biases)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, scale: Tensor, zp: Tensor) -> Tensor:  # type: ignore[override]
        shape = [-1] + [1] * (q.dim() - 1)
        return (q.float() - zp.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g: Any, q: Any, scale: Any, zp: Any) -> Any:
        return g.op("DequantizeLinear", q, scale, zp, axis_i=0)


def dynamic_qparams(x: Tensor) -> tuple[Tensor, Tensor]:
    """Run-time uint8 qparams exactly as ONNX ``DynamicQuantizeLinear`` computes them."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zp


class _DynamicMatmul(torch.autograd.Function):
    """``x @ W^T + b`` with x quantized at run time to uint8 (ONNX Runtime's dynamic INT8).

    8-bit weights go to ``MatMulInteger`` as uint8 with a zero-point of 128 (the same
    values as int8): the u8 x u8 kernels widen to 16 bits before multiplying, while the u8 x s8
    kernels of x86 CPUs without VNNI add pairs of products in int16 and saturate on full-range
    weights. Narrower weights cannot saturate and go as int8."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, wq: Tensor, ws: Tensor, bias: Tensor, unsigned: bool) -> Tensor:  # type: ignore[override]
        s, z = dynamic_qparams(x)
        xq = torch.clamp(torch.round(x / s) + z, 0, 255)
        acc = (xq - z) @ wq.float().t()
        return acc * (s * ws) + bias

    @staticmethod
    def symbolic(g: Any, x: Any, wq: Any, ws: Any, bias: Any, unsigned: bool) -> Any:
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        if unsigned:
            n = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
            acc = g.op("MatMulInteger", xq, g.op("Transpose", _unsigned(g, wq), perm_i=[1, 0]), xz, n)
        else:
            acc = g.op("MatMulInteger", xq, g.op("Transpose", wq, perm_i=[1, 0]), xz)
        y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", xs, ws))
        return g.op("Add", y, bias)


def _unsigned(g: Any, wq: Any) -> Any:
    """int8 weights as uint8 ``q + 128`` (folded into one initializer at export)."""
    return g.op("Cast", g.op("Add", g.op("Cast", wq, to_i=6), g.op("Constant", value_t=torch.tensor(128))), to_i=2)


class ScaleInput(torch.autograd.Function):
    """``x * inv_scale`` per input channel (the run-time division of AWQ and SmoothQuant); exports as
    one Mul."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inv_scale: Tensor) -> Tensor:  # type: ignore[override]
        return x * inv_scale

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:  # type: ignore[override]
        return g, None

    @staticmethod
    def symbolic(g: Any, x: Any, inv_scale: Any) -> Any:
        return g.op("Mul", x, inv_scale)


class ActQuant(nn.Module):
    """Activation quantizer: observes in ``calibrate`` mode, fake-quantizes once frozen. ``fmt``
    ``"fp8-e4m3"`` / ``"fp8-e5m2"`` rounds to 8-bit floats instead (``fp8.py``): the scale puts the
    observed range's largest magnitude on the format's largest value; the zero-point stays 0."""

    fx_leaf = True  # torch.fx keeps it one call (core/graph.py)

    scale: Tensor
    zero_point: Tensor

    def __init__(self, bits: int = 8, signed: bool = False, observer: Observer | None = None, fmt: str = "int"):
        super().__init__()
        self.bits, self.signed, self.fmt = bits, signed, fmt
        self.qmin, self.qmax = qrange(bits, signed)
        zdtype = torch.int8 if signed else torch.uint8
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=zdtype))
        self.observer = observer
        self.calibrating = observer is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            if self.observer is None:
                raise RuntimeError("ActQuant is calibrating but has no observer")
            self.observer.update(x)
            return x
        if self.fmt != "int":
            return FakeFP8.apply(x, self.scale, self.fmt)
        return _QDQ.apply(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def freeze(self) -> None:
        """Turn the observed range into qparams and stop observing."""
        if self.observer is None:
            raise RuntimeError("ActQuant.freeze needs an observer")
        if self.fmt != "int":
            if self.observer.seen == 0:
                raise ValueError(f"{self.observer.name} observer saw no finite values during calibration")
            lo, hi = self.observer.compute_range()
            self.set_qparams(fp8_scale(torch.tensor(max(-lo, hi)), self.fmt), torch.tensor(0))
            return
        scale, zp = self.observer.qparams()
        self.set_qparams(scale, zp)

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()).to(self.zero_point.dtype))
        self.calibrating = False
        self.observer = None

    def extra_repr(self) -> str:
        state = "calibrating" if self.calibrating else f"scale={float(self.scale):.3g}, zp={int(self.zero_point)}"
        kind = f"bits={self.bits}, signed={self.signed}" if self.fmt == "int" else self.fmt
        return f"{kind}, {state}"


def weight_qparams(weight: Tensor, bits: int, per_channel: bool = True, narrow: bool = True) -> tuple[Tensor, int, int]:
    """The symmetric weight scale per output channel (one shared value when not ``per_channel``)
    and the integer range, exactly as ``QuantLinear``/``QuantConv`` choose them."""
    cout = weight.shape[0]
    lo, hi = qrange(bits, signed=True, narrow=narrow)
    amax = weight.detach().reshape(cout, -1).abs().amax(1)
    if not per_channel:
        amax = amax.max().expand(cout).clone()
    scale, _ = choose_qparams(-amax, amax, bits, signed=True, symmetric=True, narrow=narrow)
    return scale.float(), lo, hi


def fake_quant_weight(weight: Tensor, bits: int, per_channel: bool = True) -> Tensor:
    """The float weights a quantized layer computes with: round to nearest on ``weight_qparams``."""
    scale, lo, hi = weight_qparams(weight, bits, per_channel)
    q = quantize(weight.detach(), scale, torch.zeros(weight.shape[0], dtype=torch.int32), lo, hi, axis=0)
    return q.float() * scale.reshape([-1] + [1] * (weight.dim() - 1))


class _QuantWeighted(DropIn, nn.Module):
    """Common part of QuantLinear and QuantConv: integer weights, quantized bias, dynamic mode.

    Each is a subclass of the torch layer it replaces (``nn.Linear``, ``nn.Conv2d``...), and of the
    user's own subclass of it where the layer had one (``core/dropin.py``): ``isinstance``, the
    layer's attributes and a subclass's own ``forward`` survive. ``weight`` reads the dequantized
    weight, as a float tensor of the original's shape, for model code that reads it."""

    fx_leaf = True  # torch.fx keeps it one call (core/graph.py)
    _layer_args = ("linear", "conv")

    weight_q: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor
    bias: Tensor  # type: ignore[assignment]
    bias_q: Tensor
    bias_scale: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None, bits: int, narrow: bool,
                 dynamic: bool, per_channel: bool, scale: Tensor | None = None, fmt: str = "int") -> None:
        nn.Module.__init__(self)  # not the torch layer's __init__: its weight is held as integers
        self.bits, self.dynamic, self.fmt = bits, dynamic, fmt
        cout = weight.shape[0]
        if fmt != "int":  # FP8 (fp8.py): the largest magnitude per channel on the format's largest value
            if dynamic or scale is not None:
                raise ValueError(f"{fmt} weights take static activations and choose their own scales")
            amax = weight.detach().reshape(cout, -1).abs().amax(1).float()
            fscale = fp8_scale(amax if per_channel else amax.max().expand(cout).clone(), fmt)
            self.bits = 8
            self.register_buffer("weight_q", to_fp8(weight.detach(), fscale.reshape([-1] + [1] * (weight.dim() - 1)), fmt))
            self.register_buffer("weight_scale", fscale)
            self.register_buffer("weight_zero_point", torch.zeros(cout, dtype=torch.int8))
            self.register_buffer("bias", (bias.detach().float() if bias is not None else torch.zeros(cout)).clone())
            self.register_buffer("bias_q", torch.zeros(cout, dtype=torch.int32))
            self.register_buffer("bias_scale", torch.ones(cout))
            self.bias_quantized = False
            self.weight_dtype = weight.dtype
            return
        observed, lo, hi = weight_qparams(weight, bits, per_channel, narrow)
        if scale is None:
            scale = observed
        elif scale.numel() not in (1, cout) or not bool((scale > 0).all()):
            raise ValueError(f"a weight scale must be positive, one value or one per output channel ({cout}); "
                             f"got shape {tuple(scale.shape)}")
        scale = scale.detach().float().reshape(-1).expand(cout).clone()
        q = quantize(weight.detach(), scale, torch.zeros(cout, dtype=torch.int32), lo, hi, axis=0)
        self.register_buffer("weight_q", q.to(torch.int8))
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("weight_zero_point", torch.zeros(cout, dtype=torch.int8))
        b = bias.detach().float() if bias is not None else torch.zeros(cout)
        self.register_buffer("bias", b.clone())
        self.register_buffer("bias_q", torch.zeros(cout, dtype=torch.int32))
        self.register_buffer("bias_scale", torch.ones(cout))
        self.bias_quantized = False
        self.weight_dtype = weight.dtype

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        """The dequantized weight (what the layer computes with), in the original's dtype and layout."""
        w = self.effective_weight().to(self.weight_dtype)
        return in_own_layout(self, w)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(f"{type(self).__name__} holds its weight as integers (weight_q, weight_scale); "
                             "it cannot be assigned")

    def quantize_bias(self, input_scale: Tensor) -> None:
        """Store the bias as int32 with scale ``s_x * s_w`` (what QLinearConv/QGemm consume); an
        FP8 layer's bias stays float (FP8 GEMMs add it in float)."""
        if self.fmt != "int":
            return
        bscale = self.weight_scale * input_scale.reshape(())
        self.bias_scale.copy_(bscale)
        self.bias_q.copy_(torch.clamp(torch.round(self.bias / bscale), -(2**31), 2**31 - 1).to(torch.int32))
        self.bias_quantized = True

    def dequantized_weight(self) -> Tensor:
        if self.fmt != "int":
            return DequantizeFP8.apply(self.weight_q, self.weight_scale, self.fmt)
        return _DQ.apply(self.weight_q, self.weight_scale, self.weight_zero_point)

    def effective_weight(self) -> Tensor:
        """The float weight that computes what the layer computes, for code that reads ``weight``."""
        return self.dequantized_weight()

    def quantized_input(self, x: Tensor) -> Tensor:
        """``x`` through the layer's own input quantizer (``input_quant``, static PTQ of a model
        torch.fx cannot trace), or as it is."""
        quant = self._modules.get("input_quant")
        return quant(x) if quant is not None else x

    def effective_bias(self) -> Tensor:
        if self.bias_quantized:
            return _DQ.apply(self.bias_q, self.bias_scale, torch.zeros_like(self.bias_q))
        return self.bias


class QuantLinear(_QuantWeighted, nn.Linear):  # type: ignore[misc]
    """Quantized ``nn.Linear``. Dynamic mode only:

    - ``input_scale`` (SmoothQuant's per-input-channel ``s``): the weight's columns were multiplied
      by ``s`` before rounding and the input is divided by it at run time; all ones otherwise, and
      then not exported.
    - ``outliers`` (input channel indices, ``quant/llm_int8.py``): those channels leave the INT8
      product (their weight columns and input values zeroed there) and are multiplied in float
      with the layer's original columns, ``outlier_weight``, beside it.

    Both live in one buffer, ``input_multiplier``: ``1 / s``, and 0 on the outlier channels.
    """

    _torch_base = nn.Linear
    input_multiplier: Tensor
    outliers: Tensor
    outlier_weight: Tensor

    def __init__(self, linear: nn.Linear, bits: int = 8, narrow: bool = True, dynamic: bool = False,
                 per_channel: bool = True, scale: Tensor | None = None, input_scale: Tensor | None = None,
                 outliers: Tensor | None = None, fmt: str = "int") -> None:
        s = torch.ones(linear.in_features) if input_scale is None else input_scale.detach().float().reshape(-1)
        if s.numel() != linear.in_features or not bool((s > 0).all()):
            raise ValueError(f"input_scale must hold {linear.in_features} positive values")
        idx = torch.empty(0, dtype=torch.long) if outliers is None else outliers.detach().long().reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= linear.in_features
                            or idx.unique().numel() != idx.numel()):
            raise ValueError(f"outlier channels must be distinct indices below {linear.in_features}; got {idx.tolist()}")
        if (input_scale is not None or idx.numel()) and not dynamic:
            raise ValueError("input_scale (SmoothQuant) and outlier channels need dynamic activations: a static "
                             "input quantizer sits before the layer and would see the whole input")
        w = linear.weight.detach() * s if input_scale is not None else linear.weight.detach()
        if idx.numel():
            w = w.clone()
            w[:, idx] = 0.0
        super().__init__(w, linear.bias, bits, narrow, dynamic, per_channel, scale, fmt)
        multiplier = 1.0 / s
        multiplier[idx] = 0.0
        self.register_buffer("input_multiplier", multiplier)
        self.register_buffer("outliers", idx.clone())
        self.register_buffer("outlier_weight", linear.weight.detach()[:, idx].float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        adopt(self, linear, skip=("weight", "bias"))

    def effective_weight(self) -> Tensor:
        """The integer weights with SmoothQuant's division folded back in and the outlier channels'
        float columns put back: ``x @ W^T`` with it is what ``forward`` computes (up to rounding)."""
        w = self.dequantized_weight()
        if not bool((self.input_multiplier == 1).all()):
            w = w * self.input_multiplier  # (x * m) @ Wq^T = x @ (Wq * m)^T; m is 0 on outlier channels
        if self.outliers.numel():
            w = w + self.outlier_weight @ F.one_hot(self.outliers, self.in_features).to(w.dtype)
        return w

    @property
    def input_scale(self) -> Tensor:
        """SmoothQuant's ``s`` per input channel (1 where not smoothed, and on outlier channels)."""
        m = self.input_multiplier
        return torch.where(m > 0, 1.0 / torch.where(m > 0, m, torch.ones_like(m)), torch.ones_like(m))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # a saved layer's outlier set has its own size: take the saved shapes before loading; files
        # written before outlier channels existed stored ``input_scale`` instead of the multiplier
        old = state_dict.pop(prefix + "input_scale", None)
        if old is not None and prefix + "input_multiplier" not in state_dict:
            state_dict[prefix + "input_multiplier"] = 1.0 / old
            state_dict.setdefault(prefix + "outliers", torch.empty(0, dtype=torch.long))
            state_dict.setdefault(prefix + "outlier_weight", torch.empty(self.out_features, 0))
        for name in ("outliers", "outlier_weight"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic:
            # N-d straight into MatMulInteger: a reshape to 2-d and back costs shape ops per layer and
            # hides the residual Add from ONNX Runtime's SkipLayerNormalization fusion
            xq = x
            if not bool((self.input_multiplier == 1).all()):  # decided on the buffer's values, also when exporting
                xq = ScaleInput.apply(x, self.input_multiplier)
            y = _DynamicMatmul.apply(xq, self.weight_q, self.weight_scale, self.bias, self.bits == 8)
            if self.outliers.numel():
                y = y + x.index_select(-1, self.outliers) @ self.outlier_weight.t()
            return y
        return F.linear(self.quantized_input(x), self.dequantized_weight(), self.effective_bias())

    def extra_repr(self) -> str:
        extra = f", float channels={self.outliers.tolist()}" if self.outliers.numel() else ""
        kind = f"bits={self.bits}" if self.fmt == "int" else self.fmt
        return f"{self.in_features}, {self.out_features}, {kind}, dynamic={self.dynamic}{extra}"


# the quantized convolutions live in conv.py; imported here so that both names work
from slimkit.quant.conv import QuantConv, QuantConv1d, QuantConv2d, numeric_padding  # noqa: E402
