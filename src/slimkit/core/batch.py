"""Calling a model with a batch, and checking batches before any work is done on them.

A batch is what the model is called with: a tensor is ``model(x)``, a tuple or list ``model(*x)``,
a dict ``model(**x)`` (Hugging Face style). Loaders that yield ``(inputs, labels)`` are adapted with
``inputs_only``; nothing is guessed.

>>> import torch
>>> call(torch.nn.Identity(), torch.ones(2)).tolist()
[1.0, 1.0]
>>> pairs = [(torch.ones(1, 3), torch.tensor([0]))]
>>> [b.shape for b in inputs_only(pairs)]
[torch.Size([1, 3])]
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batch", "call", "inputs_only", "check_batches", "calibration_batches", "tensors_of", "first_tensor",
           "modes_kept"]

log = logging.getLogger(__name__)

Batch = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]


def call(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        f"a batch must be a tensor, a tuple/list or a dict, got {type(batch).__name__}"
    )


def as_args(batch: Batch) -> tuple[Any, ...]:
    """Positional arguments for tracing/export (dicts are passed as keyword-only by the caller)."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise TypeError(f"expected a tensor or a tuple, got {type(batch).__name__}")


def inputs_only(loader: Iterable[Any]) -> Iterator[Batch]:
    """Adapt a loader of ``(inputs, labels)`` pairs to one of inputs."""
    for item in loader:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError("inputs_only expects (inputs, labels) pairs")
        yield item[0]


def tensors_of(obj: Any) -> list[Tensor]:
    """Every tensor in a (nested) batch or model output, in a stable order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping) or hasattr(obj, "to_tuple"):
        values = obj.values() if isinstance(obj, Mapping) else obj.to_tuple()
        return [t for v in values for t in tensors_of(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def first_tensor(obj: Any) -> Tensor:
    ts = tensors_of(obj)
    if not ts:
        raise TypeError(f"no tensor found in {type(obj).__name__}")
    return ts[0]


def call_checked(model: nn.Module, batch: Batch, what: str) -> Any:
    """``call(model, batch)``; a forward pass that fails raises a ``ValueError`` saying ``what`` was
    running and naming the innermost layer that was running (and its input's shape).

    >>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(5, 2))
    >>> call_checked(m, torch.randn(2, 4), "calibration batch 0")
    Traceback (most recent call last):
    ...
    ValueError: calibration batch 0: the model's forward pass failed in layer '2' (Linear, input shape [2, 3]): mat1 and mat2 shapes cannot be multiplied (2x3 and 5x2)
    """
    stack: list[tuple[str, Any]] = []
    failed: list[tuple[str, Any]] = []
    names = {id(m): n for n, m in model.named_modules()}

    def enter(module: nn.Module, args: tuple[Any, ...]) -> None:
        stack.append((names.get(id(module), "?"), args))

    def leave(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if stack:
            stack.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
               torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        return call(model, batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        failed = stack[-1:]
        hint = ""
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor) \
                and not batch[1].is_floating_point():
            hint = ("; if the batches are (inputs, labels) pairs, pass the inputs alone: "
                    "sk.inputs_only(loader)")
        if not failed or failed[0][0] in ("", "?"):
            raise ValueError(f"{what}: the model's forward pass failed: {str(e).splitlines()[0]}{hint}") from e
        name, args = failed[0]
        module = model.get_submodule(name)
        shape = next((list(a.shape) for a in args if isinstance(a, Tensor)), None)
        detail = f", input shape {shape}" if shape is not None else ""
        raise ValueError(f"{what}: the model's forward pass failed in layer {name!r} ({type(module).__name__}"
                         f"{detail}): {str(e).splitlines()[0]}{hint}") from e
    finally:
        for h in handles:
            h.remove()


def cache_free(model: nn.Module, batch: Batch) -> Batch:
    """``batch`` asking ``model`` for no key/value cache, where its forward takes ``use_cache`` (a
    Hugging Face decoder built with ``use_cache=True``) and the batch does not say: calibration and
    export want the plain forward pass, and a cache shared between repeated calls would grow."""
    if not isinstance(batch, Mapping) or "use_cache" in batch:
        return batch
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return batch
    return {**batch, "use_cache": False} if takes else batch


def check_batches(batches: Iterable[Batch] | None, what: str = "calib_data") -> list[Batch]:
    """Materialize ``batches`` and reject empty data and NaN/inf, naming the batch at fault."""
    if batches is None:
        raise ValueError(f"{what} is required for this config but none was given")
    if isinstance(batches, (Tensor, Mapping)):
        raise TypeError(
            f"{what} must be an iterable of batches (e.g. a list of tensors or a DataLoader), "
            f"not a single {type(batches).__name__}; wrap it in a list"
        )
    out = list(batches)
    if not out:
        raise ValueError(f"{what} is empty: give at least one batch")
    for i, batch in enumerate(out):
        for t in tensors_of(batch):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{what}: batch {i} holds NaN or inf values")
    return out


def positional_arity(model: nn.Module) -> int | None:
    """How many positional arguments ``model``'s forward takes (``None``: any number, or unknown)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def calibration_batches(model: nn.Module, batches: Iterable[Any], what: str = "calib_data") -> list[Batch]:
    """``check_batches``, with ``(inputs, labels)`` pairs (a ``DataLoader(TensorDataset(x, y))``)
    recognized when the model's forward takes one positional argument: the inputs are taken, and a
    log line says so once. Where the forward takes two, a pair is its two arguments, as written.

    >>> pairs = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    >>> [tuple(b.shape) for b in calibration_batches(nn.Linear(3, 2), pairs)]
    [(4, 3)]
    """
    listed = check_batches(batches, what)
    pairs = all(isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], Tensor) for b in listed)
    if pairs and positional_arity(model) == 1:
        log.info("%s: (inputs, labels) pairs; the model's forward takes one input, so the inputs are used "
                 "(sk.inputs_only(loader) says so explicitly)", what)
        return [b[0] for b in listed]  # type: ignore[index]
    return listed


def model_inputs(batch: Any) -> Batch:
    """The model's inputs of a batch: ``x`` of an ``(x, integer labels)`` pair, else the batch itself."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor) \
            and not batch[1].is_floating_point():
        return batch[0]  # type: ignore[no-any-return]
    return batch  # type: ignore[no-any-return]


@torch.no_grad()
def output_error(model: nn.Module, data: list[Batch], reference: list[list[Tensor]]) -> float:
    """Relative squared error ``sum ||f(x) - ref||^2 / sum ||ref||^2`` of ``model``'s outputs on
    ``data`` against reference outputs (``tensors_of`` of another model's, batch by batch)."""
    num = den = 0.0
    for b, ref in zip(data, reference, strict=True):
        for got, want in zip(tensors_of(call(model, b)), ref, strict=True):
            num += float((got.float() - want.float()).pow(2).sum())
            den += float(want.float().pow(2).sum())
    return num / max(den, 1e-30)


@contextlib.contextmanager
def modes_kept(*models: nn.Module) -> Iterator[None]:
    """Put the models' modules back in their train/eval modes on leaving (a probe in eval mode
    must not change the caller's model)."""
    flags = {m: m.training for model in models for m in model.modules()}
    try:
        yield
    finally:
        for m, was in flags.items():
            m.training = was
