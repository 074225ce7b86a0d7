"""Weight-only INT8 for weights a module holds itself rather than through a layer: mixture-of-experts
banks (``gate_up_proj [experts, out, in]`` in transformers 5), ``nn.MultiheadAttention``'s packed
``in_proj_weight``, a user's ``nn.Parameter`` read in its own forward.

The parameter becomes int8 values with a symmetric scale per row (per expert and output row for a
bank), and the module gets a subclass of its own class (``core/dropin.py``) in which the name
reads the dequantized tensor: the module's forward, and every function it hands the weight to,
run unchanged. The ONNX file holds the int8 values behind a ``DequantizeLinear`` (a bank is
dequantized as rows, then reshaped), so it is a quarter of the float size.

>>> import torch
>>> from torch import nn
>>> class Bank(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.experts = nn.Parameter(torch.randn(4, 8, 16))
...     def forward(self, x, i):
...         return x @ self.experts[i].t()
>>> bank = Bank()
>>> q = quantize_parameters(bank, ["experts"])
>>> isinstance(q, Bank), "experts" in dict(q.named_parameters()), tuple(q.experts.shape)
(True, False, (4, 8, 16))
>>> bool((q.experts - bank.experts).abs().max() <= q.experts_scale.max() / 2 + 1e-6)
True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["quantize_parameters", "quantizable_parameters", "quantize_held_weights", "MIN_ELEMENTS"]

MIN_ELEMENTS = 1024  # smaller weights are not worth a DequantizeLinear of their own

_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


class _DQRows(torch.autograd.Function):
    """``q [rows, cols] * scale [rows]``, exported as one per-row DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        return q.float() * scale[:, None]

    @staticmethod
    def symbolic(g: Any, q: Any, scale: Any) -> Any:
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        zp = g.op("Expand", zero, g.op("Shape", scale))
        return g.op("DequantizeLinear", q, scale, zp, axis_i=0)


def _reader(name: str) -> property:
    def get(self: nn.Module) -> Tensor:
        q, scale = getattr(self, f"{name}_q"), getattr(self, f"{name}_scale")
        rows = _DQRows.apply(q.reshape(-1, q.shape[-1]), scale.reshape(-1))
        return rows.reshape(q.shape).to(self.__dict__["slimkit_weight_dtypes"][name])

    def put(self: nn.Module, value: Tensor) -> None:
        raise AttributeError(f"{type(self).__name__}.{name} is held as int8 ({name}_q, {name}_scale); "
                             "it cannot be assigned")

    return property(get, put, doc=f"``{name}``, dequantized from int8 (read-only)")


def quantize_parameters(module: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``module`` in which each parameter of ``names`` (directly on it, two or more
    dimensions) is int8 with a scale per row, read back dequantized under its name."""
    out = copy.deepcopy(module)
    _in_place(out, names)
    return out


def _in_place(module: nn.Module, names: list[str]) -> None:
    cls = type(module)
    key = (cls, tuple(sorted(names)))
    if key not in _CLASSES:
        body: dict[str, Any] = {n: _reader(n) for n in names}
        body.update({"__module__": cls.__module__, "__qualname__": f"Slim{cls.__qualname__}",
                     "slimkit_quantized_parameters": tuple(sorted(names)), "fx_leaf": True})
        _CLASSES[key] = type(f"Slim{cls.__name__}", (cls,), body)
    dtypes: dict[str, torch.dtype] = {}
    for name in names:
        w = module._parameters.get(name)
        if not isinstance(w, Tensor) or w.dim() < 2 or not w.is_floating_point():
            raise ValueError(f"{cls.__name__}.{name} is not a floating-point parameter of two or more dimensions")
        rows = w.detach().float().reshape(-1, w.shape[-1])
        scale = (rows.abs().amax(1) / 127.0).clamp_min(1e-12)
        q = torch.clamp(torch.round(rows / scale[:, None]), -127, 127).to(torch.int8)
        del module._parameters[name]
        module.register_buffer(f"{name}_q", q.reshape(w.shape))
        module.register_buffer(f"{name}_scale", scale.reshape(w.shape[:-1]))
        dtypes[name] = w.dtype
    module.__class__ = _CLASSES[key]  # a subclass of its own class: its forward and attributes stay
    module.__dict__["slimkit_weight_dtypes"] = dtypes


def quantizable_parameters(model: nn.Module, covered: set[str]) -> dict[str, list[str]]:
    """Per module, the weights it holds itself that no quantized layer covers: floating point,
    two or more dimensions, at least ``MIN_ELEMENTS`` values, not tied to another module."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    found: dict[str, list[str]] = {}
    for mname, m in model.named_modules():
        if mname in covered or isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            continue
        for pname, p in m._parameters.items():
            if p is not None and p.dim() >= 2 and p.is_floating_point() and p.numel() >= MIN_ELEMENTS \
                    and owners.get(id(p), 0) == 1:
                found.setdefault(mname, []).append(pname)
    return found


def quantize_held_weights(model: nn.Module, covered: set[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """Quantize, in place, every weight ``quantizable_parameters`` finds; returns their names."""
    done = []
    for mname, pnames in quantizable_parameters(model, covered).items():
        if any(mname == e or mname.startswith(e + ".") for e in exclude):
            continue
        _in_place(model.get_submodule(mname), pnames)
        done += [f"{mname}.{p}" if mname else p for p in pnames]
    return done
