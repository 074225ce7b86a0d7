"""Weight-only quantization of weights a module holds itself rather than through a layer:
mixture-of-experts banks (``gate_up_proj [experts, out, in]`` in transformers 5),
``nn.MultiheadAttention``'s packed ``in_proj_weight``, a user's ``nn.Parameter`` read in its own forward.

At 8 bits the parameter becomes int8 values with a symmetric scale per row (per expert and output
row for a bank); with ``group_size`` it becomes 2- to 4-bit values in groups along the last
(input) axis, each group with a scale and a zero-point, two values to a byte: the grid the
group-wise presets give Linear layers (``weight_only.py``); with ``fmt="nf4"`` it becomes NF4
codes in groups, each with its absmax (``nf4.py``). Either way the module gets a subclass
of its own class (``core/dropin.py``) in which the name reads the dequantized tensor: the module's
forward, and every function it hands the weight to, run unchanged. The ONNX file holds the
integers: at 8 bits behind a ``DequantizeLinear`` (a bank is dequantized as rows, then reshaped),
a quarter of the float size; at 4 bits as the packed bytes, split with BitShift, an eighth plus
the groups' scales (NF4: then a Gather of the codebook and a Mul by the absmax).

>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
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
>>> q4 = quantize_parameters(bank, ["experts"], bits=4, group_size=8)
>>> tuple(q4.experts_q.shape), q4.experts_q.dtype, tuple(q4.experts_scale.shape)
((4, 8, 8), torch.uint8, (4, 8, 2))
>>> err = (q4.experts - bank.experts).abs()  # half a step, or one where a group's extreme has its opposite clipped
>>> bool(err.max() <= q4.experts_scale.abs().max() + 1e-6) and bool(err.median() <= q4.experts_scale.abs().max() / 2)
True
>>> nf = quantize_parameters(bank, ["experts"], bits=4, group_size=8, fmt="nf4")
>>> tuple(nf.experts_q.shape), tuple(nf.experts_absmax.shape)
((4, 8, 8), (4, 8, 2))
>>> bool(((nf.experts - bank.experts).abs() <= 0.152 * nf.experts_absmax.repeat_interleave(8, -1)).all())
True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.quant.nf4 import NF4, dequant_stored, nf4_groups
from slimkit.quant.weight_only import dequantize_groups, pack_nibbles, rtn_groups, split_stored

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
        q = getattr(self, f"{name}_q")
        shape = self.__dict__["slimkit_weight_shapes"][name]
        if f"{name}_absmax" in self._buffers:  # NF4 codes, an absmax per group
            absmax = getattr(self, f"{name}_absmax")
            return dequant_stored(q.reshape(-1, q.shape[-1]), absmax.reshape(-1, absmax.shape[-1]), NF4
                                  ).reshape(shape).to(self.__dict__["slimkit_weight_dtypes"][name])
        scale = getattr(self, f"{name}_scale")
        if q.dtype == torch.uint8:  # packed nibbles, a scale and a zero-point per group
            zp = getattr(self, f"{name}_zero_point")
            rows = dequantize_groups(split_stored(q.reshape(-1, q.shape[-1])), scale.reshape(-1, scale.shape[-1]),
                                     zp.reshape(-1, zp.shape[-1]).float())
        else:
            rows = _DQRows.apply(q.reshape(-1, q.shape[-1]), scale.reshape(-1))
        return rows.reshape(shape).to(self.__dict__["slimkit_weight_dtypes"][name])

    def put(self: nn.Module, value: Tensor) -> None:
        raise AttributeError(f"{type(self).__name__}.{name} is held as integers ({name}_q and its scales); "
                             "it cannot be assigned")

    return property(get, put, doc=f"``{name}``, dequantized from integers (read-only)")


def quantize_parameters(module: nn.Module, names: list[str], bits: int = 8, group_size: int | None = None,
                        symmetric: bool = True, fmt: str = "int") -> nn.Module:
    """A copy of ``module`` in which each parameter of ``names`` (directly on it, two or more
    dimensions) is int8 with a scale per row, or, with ``group_size``, ``bits``-bit groups along its
    last axis (``fmt="nf4"``: NF4 codes, 4 bits), read back dequantized under its name."""
    out = copy.deepcopy(module)
    _in_place(out, names, bits, group_size, symmetric, fmt)
    return out


def _check_grid(cls: type, name: str, w: Tensor, bits: int, group_size: int | None, fmt: str = "int") -> None:
    if not isinstance(w, Tensor) or w.dim() < 2 or not w.is_floating_point():
        raise ValueError(f"{cls.__name__}.{name} is not a floating-point parameter of two or more dimensions")
    if fmt not in ("int", "nf4"):
        raise ValueError(f"held weights are integers or NF4 codes; got fmt={fmt!r}")
    if fmt == "nf4" and (bits != 4 or group_size is None):
        raise ValueError(f"{cls.__name__}.{name}: NF4 held weights are 4-bit codes in groups: give bits=4 and a "
                         "group_size")
    if group_size is None:
        if bits != 8:
            raise ValueError(f"{cls.__name__}.{name}: a held weight is int8 per row, or group-wise at 2-4 bits "
                             f"with a group_size; got {bits} bits without groups")
        return
    if bits not in (2, 3, 4):
        raise ValueError(f"{cls.__name__}.{name}: group-wise held weights are 2, 3 or 4 bits, got {bits}")
    if group_size < 2 or group_size % 2:
        raise ValueError(f"{cls.__name__}.{name}: group-wise held weights need an even group_size, got {group_size}")
    if w.shape[-1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the last axis of {cls.__name__}.{name} "
                         f"({w.shape[-1]} values)")


def _in_place(module: nn.Module, names: list[str], bits: int = 8, group_size: int | None = None,
              symmetric: bool = True, fmt: str = "int") -> None:
    cls = type(module)
    key = (cls, tuple(sorted(names)))
    if key not in _CLASSES:
        body: dict[str, Any] = {n: _reader(n) for n in names}
        body.update({"__module__": cls.__module__, "__qualname__": f"Slim{cls.__qualname__}",
                     "slimkit_quantized_parameters": tuple(sorted(names)), "fx_leaf": True})
        _CLASSES[key] = type(f"Slim{cls.__name__}", (cls,), body)
    for name in names:  # every name checked before any is changed
        _check_grid(cls, name, module._parameters.get(name), bits, group_size, fmt)  # type: ignore[arg-type]
    dtypes: dict[str, torch.dtype] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        w = module._parameters[name]
        assert w is not None
        rows = w.detach().float().reshape(-1, w.shape[-1])
        lead = tuple(w.shape[:-1])
        if group_size is None:
            scale = (rows.abs().amax(1) / 127.0).clamp_min(1e-12)
            q = torch.clamp(torch.round(rows / scale[:, None]), -127, 127).to(torch.int8)
            module.register_buffer(f"{name}_q", q.reshape(w.shape))
            module.register_buffer(f"{name}_scale", scale.reshape(lead))
        elif fmt == "nf4":
            codes, absmax = nf4_groups(rows, group_size)
            module.register_buffer(f"{name}_q", pack_nibbles(codes).reshape(*lead, -1))
            module.register_buffer(f"{name}_absmax", absmax.reshape(*lead, -1))
        else:
            q, scale, zp = rtn_groups(rows, bits, group_size, symmetric)
            module.register_buffer(f"{name}_q", pack_nibbles(q).reshape(*lead, -1))
            module.register_buffer(f"{name}_scale", scale.float().reshape(*lead, -1))
            module.register_buffer(f"{name}_zero_point", zp.to(torch.uint8).reshape(*lead, -1))
        del module._parameters[name]
        dtypes[name], shapes[name] = w.dtype, tuple(w.shape)
    module.__class__ = _CLASSES[key]  # a subclass of its own class: its forward and attributes stay
    module.__dict__.setdefault("slimkit_weight_dtypes", {}).update(dtypes)
    module.__dict__.setdefault("slimkit_weight_shapes", {}).update(shapes)


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


def quantize_held_weights(model: nn.Module, covered: set[str], exclude: tuple[str, ...] = (), bits: int = 8,
                          group_size: int | None = None, symmetric: bool = True,
                          skipped: dict[str, str] | None = None, fmt: str = "int") -> list[str]:
    """Quantize, in place, every weight ``quantizable_parameters`` finds; returns their names. A
    module whose weights do not fit the grid (a last axis the group size does not divide) is left
    in float, with the reason in ``skipped``."""
    done = []
    for mname, pnames in quantizable_parameters(model, covered).items():
        if any(mname == e or mname.startswith(e + ".") for e in exclude):
            continue
        module = model.get_submodule(mname)
        fits = []
        for p in pnames:
            try:
                _check_grid(type(module), p, module._parameters[p], bits, group_size, fmt)  # type: ignore[arg-type]
                fits.append(p)
            except ValueError as e:
                if skipped is not None:
                    skipped[f"{mname}.{p}" if mname else p] = str(e)
        if fits:
            _in_place(module, fits, bits, group_size, symmetric, fmt)
            done += [f"{mname}.{p}" if mname else p for p in fits]
    return done
