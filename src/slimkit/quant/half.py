"""Half precision: FP16 (IEEE binary16: 10 mantissa bits, range to 65504) and BF16 (bfloat16: 7
mantissa bits, FP32's range), the baselines GPU deployments start from.

Two forms (``HalfPrecision.compute``):

- ``"half"``: the model computes in the 16-bit type, as it would on a GPU. Each module's own
  parameters are cast, and a forward pre-hook casts its floating inputs to the type; the modules
  that lose precision in half (normalizations, softmax modules, and the user's ``keep_float``)
  keep FP32 parameters, get their inputs cast up to FP32 and their outputs cast back. Buffers (rotary frequencies, running
  statistics) stay as they are, and the model's floating outputs come back in FP32, so code around
  it is unchanged. Functional softmax and reductions inside model code run in whatever type reaches
  them (Hugging Face attention computes its softmax in FP32 itself).
- ``"float32"``: the weights are rounded to the 16-bit type and stored so in the exported file
  (half its size), the arithmetic stays FP32: the form every runtime, ONNX Runtime's CPU provider
  included, runs.

Either way the module tree, classes and attributes are the user's own.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
>>> half, cast, kept = to_half(model, "float16", "half")
>>> half[0].weight.dtype, half[1].weight.dtype, half(torch.randn(3, 8)).dtype
(torch.float16, torch.float32, torch.float32)
>>> cast, kept
(['0', '2'], {'1': 'normalization: kept in float32'})
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DTYPES", "to_half", "is_kept", "round_to"]

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def round_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t``'s values rounded to ``dtype`` (nearest even), in ``t``'s own dtype; values beyond FP16's
    range saturate at its largest finite value rather than becoming infinite."""
    if dtype == torch.float16:
        big = torch.finfo(torch.float16).max
        return t.clamp(-big, big).to(dtype).to(t.dtype)
    return t.to(dtype).to(t.dtype)


def is_kept(name: str, module: nn.Module, keep_float: tuple[str, ...]) -> str | None:
    """Why ``module`` keeps FP32 arithmetic, or None: normalizations (any class named ``...Norm...``:
    LayerNorm, RMSNorm, GroupNorm, BatchNorm), softmax modules, torch's ``nn.MultiheadAttention``, and
    ``keep_float`` (module names, with their submodules, or class names)."""
    cls = type(module).__name__
    if any(name == k or name.startswith(k + ".") or cls == k for k in keep_float):
        return "keep_float: kept in float32"
    if "Norm" in cls:
        return "normalization: kept in float32"
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        return "softmax: kept in float32"
    if isinstance(module, nn.MultiheadAttention):
        # its FP16 graph (a batched q @ k^T through Transpose) crashes ONNX Runtime 1.32's CPU provider while
        # it loads the file (MatmulTransposeFusion with the NCHWc layout pass: a segmentation fault)
        return "nn.MultiheadAttention: kept in float32 (ONNX Runtime's CPU provider crashes on its FP16 graph)"
    return None


def _cast(x: Any, frm: tuple[torch.dtype, ...], to: torch.dtype) -> Any:
    """Floating tensors of a type in ``frm`` inside ``x`` (tuples, lists, dicts, ``ModelOutput``s) cast to ``to``."""
    if isinstance(x, Tensor):
        return x.to(to) if x.dtype in frm else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
        return type(x)(*(_cast(v, frm, to) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, frm, to) for v in x)
    if isinstance(x, Mapping) and dataclasses.is_dataclass(x):  # a Hugging Face ModelOutput
        for k in list(x.keys()):
            x[k] = _cast(x[k], frm, to)
        return x
    if isinstance(x, dict):
        return {k: _cast(v, frm, to) for k, v in x.items()}
    return x


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _inputs_to(dtype: torch.dtype, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    frm = tuple(d for d in _FLOATS if d != dtype)
    return _cast(args, frm, dtype), _cast(kwargs, frm, dtype)


def _outputs_to(dtype: torch.dtype, half: torch.dtype, module: nn.Module, args: Any, out: Any) -> Any:
    return _cast(out, (half,), dtype)


def to_half(model: nn.Module, dtype: str, compute: str, keep_float: tuple[str, ...] = (),
            inplace: bool = False) -> tuple[nn.Module, list[str], dict[str, str]]:
    """``(model, cast, kept)``: the model in half precision (``compute``: ``"half"`` or
    ``"float32"``, see the module docstring), the modules whose parameters were cast or rounded,
    and the modules kept in FP32 with the reason."""
    if dtype not in DTYPES:
        raise ValueError(f"half precision is one of {', '.join(DTYPES)}; got {dtype!r}")
    if compute not in ("half", "float32"):
        raise ValueError(f"compute is 'half' (16-bit arithmetic) or 'float32' (16-bit weights); got {compute!r}")
    half = DTYPES[dtype]
    out = model if inplace else copy.deepcopy(model)
    cast: list[str] = []
    kept: dict[str, str] = {}
    for name, m in out.named_modules():
        own = [(k, p) for k, p in m._parameters.items() if p is not None and p.is_floating_point()]
        why = is_kept(name, m, keep_float)
        if why is None and any(name.startswith(k + ".") for k in kept):  # inside a kept module
            why = kept[next(k for k in kept if name.startswith(k + "."))]
        if why is not None:
            if own:
                kept[name] = why
            if compute == "half" and (own or why.startswith("softmax")) and name:
                # FP32 inside, the 16-bit type out: the stream between modules stays in one type, as
                # mixed-precision inference runs (a float32 mask or residual would otherwise meet a
                # 16-bit product in a matmul, which does not promote)
                m.register_forward_pre_hook(partial(_inputs_to, torch.float32), with_kwargs=True)
                m.register_forward_hook(partial(_outputs_to, half, torch.float32))
            continue
        if not own:
            continue
        with torch.no_grad():
            for _, p in own:
                if compute == "half":
                    p.data = round_to(p.data, half).to(half)
                else:
                    p.data = round_to(p.data, half)
        if compute == "half":
            m.register_forward_pre_hook(partial(_inputs_to, half), with_kwargs=True)
        cast.append(name)
    if compute == "half":
        out.register_forward_hook(partial(_outputs_to, torch.float32, half))
    return out, cast, kept
