"""The modules quantization-aware training runs: float weights and activations, fake-quantized
with the straight-through estimator, then converted to the PTQ modules (``QuantConv``,
``QuantLinear``, ``ActQuant``) that export to integer ONNX.

- ``FakeQuantWeighted`` wraps one Linear/Conv and, optionally, the BatchNorm after it. With a
  BatchNorm it simulates folding (Jacob et al. 2018; Krishnamoorthi 2018, sec. 3.2): the weights
  are scaled by ``gamma / sqrt(running_var + eps)`` before fake quantization, exactly as they will
  be folded, the convolution's output is unscaled and the BatchNorm then normalizes with the batch
  statistics, which keeps training stable; once ``freeze_bn`` is called the running statistics are
  used and stop moving, and the layer computes what the folded, quantized one will.
- ``FakeQuantAct`` quantizes an activation: ``"ste"`` tracks its range with a moving average until
  ``freeze_observer``; ``"lsq"`` learns the step size; ``"pact"`` learns the clipping level.

Every one starts from the ranges PTQ calibration gives (``calibrating`` mode, then ``init_from``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.affine import choose_qparams, fake_quantize, qrange
from slimkit.core.graph import fuse_conv_bn_weights
from slimkit.quant.calibrators import Observer
from slimkit.quant.lsq import lsq_quantize, step_gradient_scale
from slimkit.quant.modules import ActQuant, QuantConv, QuantLinear, weight_qparams
from slimkit.quant.pact import pact_qparams, pact_quantize

__all__ = ["FakeQuantWeighted", "FakeQuantAct", "QAT_METHODS"]

QAT_METHODS = ("ste", "lsq", "pact")


class FakeQuantWeighted(nn.Module):
    """A Linear/Conv1d/Conv2d (and its BatchNorm) with fake-quantized, per-channel symmetric weights.

    ``learn_scale``: the weight step sizes are LSQ parameters (initialized to the min-max scales);
    otherwise they follow the weights' current range at every step.
    """

    bn_frozen: Tensor

    def __init__(self, layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None, bits: int,
                 per_channel: bool = True, learn_scale: bool = False) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise TypeError(f"FakeQuantWeighted wraps Linear/Conv1d/Conv2d, not {type(layer).__name__}")
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            raise ValueError(f"zero padding given as numbers is supported, not {layer.padding!r}/{layer.padding_mode!r}")
        self.layer, self.bn = layer, bn
        self.bits, self.per_channel = bits, per_channel
        self.register_buffer("bn_frozen", torch.tensor(bn is None))
        self.step: nn.Parameter | None = None
        if learn_scale:
            with torch.no_grad():
                scale, _, _ = weight_qparams(self._folded_weight(), bits, per_channel)
            self.step = nn.Parameter(scale if per_channel else scale[:1].clone())

    def _bn_scale(self) -> Tensor | None:
        """``gamma / sqrt(running_var + eps)``, one value per output channel."""
        bn = self.bn
        if bn is None:
            return None
        assert bn.running_var is not None
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def _folded_weight(self) -> Tensor:
        w: Tensor = self.layer.weight
        sf = self._bn_scale()
        return w if sf is None else w * sf.reshape([-1] + [1] * (w.dim() - 1))

    def quantized_weight(self) -> Tensor:
        """The folded weights on their integer grid (float values, straight-through gradient)."""
        w = self._folded_weight()
        lo, hi = qrange(self.bits, signed=True, narrow=True)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        if self.step is not None:
            g = step_gradient_scale(w[0].numel() if self.per_channel else w.numel(), hi)
            step = self.step.expand(w.shape[0])
            return lsq_quantize(w, step, zero, lo, hi, g, axis=0)
        scale, _, _ = weight_qparams(w, self.bits, self.per_channel)
        return fake_quantize(w, scale, zero, lo, hi, axis=0)

    def _compute(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        layer: Any = self.layer
        return layer._conv_forward(x, w, b)

    def forward(self, x: Tensor) -> Tensor:
        wq = self.quantized_weight()
        bias: Tensor | None = self.layer.bias
        bn = self.bn
        if bn is None:
            return self._compute(x, wq, bias)
        sf = self._bn_scale()
        assert sf is not None and bn.running_mean is not None and bn.running_var is not None
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = self._compute(x, wq, None)
        if self.training and not bool(self.bn_frozen):
            safe = torch.where(sf == 0, torch.ones_like(sf), sf)
            y = y / safe.reshape(shape)  # the unscaled convolution, whose batch statistics BN takes
            if bias is not None:
                y = y + bias.reshape(shape)
            return bn(y)
        # frozen statistics: exactly the folded layer, conv(x, q(w * sf)) + (b - mean) * sf + beta
        beta = bn.bias if bn.bias is not None else torch.zeros_like(sf)
        b = bias if bias is not None else torch.zeros_like(sf)
        return y + ((b - bn.running_mean) * sf + beta).reshape(shape)

    def freeze_bn(self) -> None:
        """Stop updating the BatchNorm statistics; compute with the running ones from now on."""
        self.bn_frozen.fill_(True)

    @torch.no_grad()
    def to_quant(self) -> QuantLinear | QuantConv:
        """The integer layer with the folded weights on the grid training ended on."""
        layer = copy.deepcopy(self.layer)
        if self.bn is not None:
            w, b = fuse_conv_bn_weights(self.layer.weight, self.layer.bias, self.bn)
            layer.weight.copy_(w)
            layer.bias = nn.Parameter(b)
        scale = self.step.detach().clamp_min(1e-8) if self.step is not None else None
        if isinstance(layer, nn.Linear):
            return QuantLinear(layer, self.bits, per_channel=self.per_channel, scale=scale)
        return QuantConv(layer, self.bits, per_channel=self.per_channel, scale=scale)

    def extra_repr(self) -> str:
        learned = ", learned step" if self.step is not None else ""
        return f"bits={self.bits}, batchnorm={'folded' if self.bn is not None else 'none'}{learned}"


class FakeQuantAct(nn.Module):
    """Unsigned 8-bit activation fake quantization for QAT (``method``: ste, lsq or pact)."""

    running_min: Tensor
    running_max: Tensor
    zero_point: Tensor
    observer_frozen: Tensor

    def __init__(self, bits: int = 8, method: str = "ste", observer: Observer | None = None,
                 averaging: float = 0.01) -> None:
        super().__init__()
        if method not in QAT_METHODS:
            raise ValueError(f"method must be one of {QAT_METHODS}, got {method!r}")
        self.bits, self.method, self.averaging = bits, method, averaging
        self.qmin, self.qmax = qrange(bits, signed=False)
        self.observer = observer
        self.calibrating = observer is not None
        self.register_buffer("running_min", torch.tensor(0.0))
        self.register_buffer("running_max", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("observer_frozen", torch.tensor(method != "ste"))
        self.step = nn.Parameter(torch.tensor(1.0)) if method == "lsq" else None
        self.alpha = nn.Parameter(torch.tensor(1.0)) if method == "pact" else None

    @torch.no_grad()
    def init_from_observer(self) -> None:
        """Start from the calibrated range (PTQ's qparams)."""
        if self.observer is None:
            raise RuntimeError("FakeQuantAct.init_from_observer needs an observer")
        lo, hi = self.observer.compute_range() if self.observer.seen else (0.0, 0.0)
        if not self.observer.seen:
            raise ValueError("the activation quantizer saw no finite values during calibration")
        self.running_min.fill_(min(lo, 0.0))
        self.running_max.fill_(max(hi, 0.0))
        scale, zp = choose_qparams(self.running_min, self.running_max, self.bits, signed=False)
        self.zero_point.fill_(float(zp))
        if self.step is not None:
            self.step.fill_(float(scale))
        if self.alpha is not None:
            self.alpha.fill_(max(hi, 1e-3))
        self.calibrating = False
        self.observer = None

    def qparams(self) -> tuple[Tensor, Tensor]:
        """The (scale, zero-point) the quantizer uses now."""
        if self.step is not None:
            return self.step.detach().clamp_min(1e-8), self.zero_point.detach().round()
        if self.alpha is not None:
            return pact_qparams(self.alpha, self.running_min, self.qmin, self.qmax)
        return choose_qparams(self.running_min, self.running_max, self.bits, signed=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            if self.observer is None:
                raise RuntimeError("FakeQuantAct is calibrating but has no observer")
            self.observer.update(x)
            return x
        if self.step is not None:
            g = step_gradient_scale(x[0].numel() if x.dim() > 1 else x.numel(), self.qmax)
            return lsq_quantize(x, self.step, self.zero_point.round(), self.qmin, self.qmax, g)
        if self.alpha is not None:
            return pact_quantize(x, self.alpha, self.running_min, self.qmin, self.qmax)
        if self.training and not bool(self.observer_frozen):
            with torch.no_grad():
                c = self.averaging
                self.running_min.mul_(1 - c).add_(c * x.detach().min().clamp(max=0.0))
                self.running_max.mul_(1 - c).add_(c * x.detach().max().clamp(min=0.0))
        scale, zp = self.qparams()
        return fake_quantize(x, scale, zp, self.qmin, self.qmax)

    def freeze_observer(self) -> None:
        self.observer_frozen.fill_(True)

    def to_quant(self) -> ActQuant:
        scale, zp = self.qparams()
        q = ActQuant(self.bits, signed=False)
        q.set_qparams(scale.float(), zp.to(torch.int32))
        return q

    def extra_repr(self) -> str:
        if self.calibrating:
            return f"{self.method}, calibrating"
        scale, zp = self.qparams()
        return f"{self.method}, scale={float(scale):.3g}, zp={int(zp)}"
