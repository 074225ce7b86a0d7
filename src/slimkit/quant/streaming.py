"""Quantizing a model larger than memory, one block at a time, from its safetensors shards.

``sk.quantize(folder, "int4-gptq", calib_data)`` with a Hugging Face model folder in place of a
model. The model is built as a skeleton whose parameters take no memory (``core/checkpoint.py``);
what lies outside its stack of repeated blocks (the embedding table, the final norm, the output
head) is loaded, and the inputs of the first block are caught on ``calib_data``. Then, for each
block in turn: its float weights are loaded from the shards, its layers are quantized with the
passes (GPTQ and AWQ each layer on its inputs with the layers before it already quantized, as in
the whole-model sweep, ``weight_passes.py``), and the block's outputs on the quantized and on the
float path become the next block's inputs. The float weights are then dropped and the quantized
block waits on disk: what memory holds is one float block and the calibration activations, not
the float model. The layers outside the stack are quantized last, with the blocks passed over:
the model runs its own layers before and after them on the hidden states the sweep already has
(the quantized path's last outputs), which is what the whole (now quantized) model would give.

Each block's output on the quantized path is compared with the float path's (relative L2 on the
first calibration batch); a block that takes it beyond the noise is an error naming it, and the
comparisons, with each block's time, are in ``plan.passes["streamed"]``. The result is the same
model, with the same plan, as quantizing the loaded model would give, and saves, loads and exports
the same way.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.core.batch import Batch, cache_free, call, check_batches
from slimkit.core.checkpoint import Checkpoint, release_memory
from slimkit.core.fidelity import FidelityError, first_tensor, relative_error
from slimkit.core.layers import canonicalize, restore
from slimkit.core.plans import attach
from slimkit.core.progress import progress

from .passes import AWQ, GPTQ, Activations, Embeddings, Quantize, Weights
from .ptq import QuantPlan, _prepare, _report
from .sequential import _catch, _chained, _record, _same, repeated_blocks
from .swap import quantize_held, swap_weighted
from .weight_passes import weight_passes

__all__ = ["quantize_checkpoint", "STREAMABLE"]

log = logging.getLogger(__name__)

STREAMABLE = (Weights, Activations, GPTQ, AWQ, Embeddings)
_LIMIT = 1.0  # relative L2 of a block's output at narrow widths (ptq._report's limit)


def _check(q: Quantize) -> None:
    if q.activations.mode == "static":
        raise ValueError("static activations are calibrated on the whole model; block by block, quantize "
                         "weight-only (int4-weight, int4-gptq, int4-awq) or with dynamic activations (int8-dynamic)")
    other = [type(p).__name__ for p in q.passes if not isinstance(p, STREAMABLE)]
    if other:
        raise ValueError(f"quantizing a checkpoint block by block runs {', '.join(c.__name__ for c in STREAMABLE)}; "
                         f"{', '.join(other)} need the whole model: load it and call sk.quantize(model, ...)")


def _batch(model: nn.Module, b: Batch) -> Batch:
    if isinstance(b, Tensor) and "input_ids" in inspect.signature(model.forward).parameters:
        b = {"input_ids": b}
    return cache_free(model, b)


def _named(block: nn.Module, args: Any, kwargs: Any) -> dict[str, Any]:
    """A block's ``(args, kwargs)`` as keyword arguments, a batch the weight passes can call it with."""
    sig = inspect.signature(block.forward)
    out: dict[str, Any] = {}
    for name, value in sig.bind(*args, **kwargs).arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"{type(block).__name__} takes *{name}; block-by-block calibration calls it by keyword")
        else:
            out[name] = value
    return out


def _without(q: Quantize, names: list[str], embeddings: bool = True) -> Quantize:
    """``q`` with ``names`` added to the weights' ``exclude`` (and without the Embeddings pass)."""
    passes = [dataclasses.replace(p, exclude=(*p.exclude, *names)) if isinstance(p, Weights) else p
              for p in q.passes if embeddings or not isinstance(p, Embeddings)]
    if q.find(Weights) is None:
        passes.insert(0, Weights(exclude=tuple(names)))
    return Quantize.of(passes, calib_batches=q.calib_batches)


def _prefixed(summary: Mapping[str, Any], block: str, into: dict[str, Any]) -> None:
    """Merge a weight-pass summary into the plan's, its layer names under ``block`` (none when empty)."""
    at = f"{block}." if block else ""
    for key, value in summary.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(f"{at}{v}" if isinstance(v, str) else v for v in value)
        elif isinstance(value, dict):
            into.setdefault(key, {}).update({f"{at}{k}": v for k, v in value.items()})
        else:
            into[key] = value


def _tensors(module: nn.Module) -> dict[str, list[str]]:
    """Each tensor of ``module`` (parameters and buffers, persistent or not) by its first name, with
    every name holding it."""
    names: dict[int, list[str]] = {}
    for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
    return {ns[0]: ns for ns in names.values()}


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    m = module.get_submodule(owner)
    if attr in m._parameters:
        m._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        m._buffers[attr] = value


def _offload(module: nn.Module, path: str) -> None:
    """Write ``module``'s tensors to ``path`` and leave them on ``meta``: a quantized block waits on
    disk while the next ones are quantized ("write it, free it")."""
    from safetensors.torch import save_file

    groups = _tensors(module)
    flat = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    save_file({n: flat[n].detach().contiguous() for n in groups}, path)
    for first, names in groups.items():
        meta = torch.empty_like(flat[first], device="meta")
        for n in names:
            _set(module, n, meta)


def _restore(module: nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    state = load_file(path)  # read whole: a quantized block is small
    for first, names in _tensors(module).items():
        for n in names:
            _set(module, n, state[first])


def _unload(model: nn.Module, skip: tuple[str, ...]) -> None:
    """The float embedding tables and plain Linear layers outside the blocks back on ``meta``, to be
    loaded again from the checkpoint for the head: they are not needed while the blocks are."""
    empty: dict[int, nn.Parameter] = {}  # one meta parameter per parameter: tied ones stay tied
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip) or type(m) not in (nn.Embedding, nn.Linear):
            continue
        for attr, p in list(m._parameters.items()):
            if p is not None:
                if id(p) not in empty:
                    empty[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                m._parameters[attr] = empty[id(p)]


def _hidden(call_args: tuple[Any, Any]) -> Tensor:
    args, kwargs = call_args
    return args[0] if args else kwargs["hidden_states"]


def _head(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


@contextlib.contextmanager
def _passed_over(model: nn.Module, stack: list[str], first: list[Tensor], last: list[Tensor],
                 form: tuple[Any, ...] | None) -> Iterator[None]:
    """Within it, each block of ``stack`` is passed over (its input handed on, in the form a block
    returns: a tensor, or a tuple with ``form`` after it) and the last one returns ``last[k]`` when
    the first was given ``first[k]``: the model runs its layers outside the blocks on hidden states
    the block-by-block sweep already has, without running (or holding) the blocks again. An input
    to the first block that is none of ``first`` is an error."""
    at: list[int] = []

    def over(i: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            h = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                k = next((k for k, f in enumerate(first) if f.shape == h.shape and torch.equal(f, h)), None)
                if k is None:
                    raise RuntimeError(f"{stack[0]!r} was given hidden states the block-by-block sweep did not "
                                       "see: the layers before the blocks changed (report this as a bug)")
                at[:] = [k]
            if i == len(stack) - 1:
                h = last[at[0]]
            return h if form is None else (h, *form)
        return forward

    blocks = [model.get_submodule(name) for name in stack]
    for i, block in enumerate(blocks):
        block.forward = over(i)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@torch.no_grad()
def quantize_checkpoint(folder: str | os.PathLike[str], cfg: Quantize, calib_data: Any = None,
                        model_class: Any = None) -> nn.Module:
    """Quantize the model in ``folder`` block by block (module docstring); returns the quantized model."""
    _check(cfg)
    if calib_data is None:  # round to nearest needs none; the blocks are still checked on it
        raise ValueError("quantizing a checkpoint block by block needs calib_data: each block is checked against "
                         "its float outputs on it (a few batches of input_ids are enough)")
    ckpt = Checkpoint(folder)
    model = ckpt.skeleton(model_class)
    probe = copy.deepcopy(model)  # parameters on meta: no memory
    canonicalize(probe)  # Hugging Face's Conv1D counts as the Linear it is
    stack = repeated_blocks(probe)
    del probe
    if len(stack) < 2:
        raise ValueError(f"{type(model).__name__} in {ckpt.folder} has no stack of repeated blocks to quantize one at "
                         "a time; load it and call sk.quantize(model, ...)")
    ckpt.check(model)
    ckpt.load(model, skip=tuple(stack))
    canonicalize(model, skip=tuple(stack))  # each block when it is loaded
    release_memory()
    batches = [_batch(model, b) for b in check_batches(calib_data)][: cfg.calib_batches]
    for i, b in enumerate(batches):
        mask = b.get("attention_mask") if isinstance(b, Mapping) else None
        if isinstance(mask, Tensor) and not bool(mask.bool().all()):
            log.warning("calibration batch %d has padding: block by block, its padded positions count in the "
                        "statistics (give unpadded sequences)", i)
            break
    inputs = _catch(model, model.get_submodule(stack[0]), batches)
    if inputs is None:
        raise ValueError(f"a calibration batch never reaches {stack[0]!r}: the model does not run its blocks on it")
    ref = [(tuple(a), dict(k)) for a, k in inputs]  # the float path; tensors are replaced, not changed
    first = [_hidden(x) for x in inputs]  # what the first block is given, on either path (the tables are float still)
    q_block = _without(cfg, [], embeddings=False)
    plan = QuantPlan(config=cfg)
    streamed: list[dict[str, Any]] = []
    held: list[str] = []  # weights the blocks' modules hold themselves (expert banks), quantized with their block
    held_pass: dict[str, Any] = {}
    form: tuple[Any, ...] | None = None
    spill = tempfile.mkdtemp(prefix="slimkit-blocks-")  # the quantized blocks, until the last is done
    try:
        started = time.perf_counter()
        for i, name in enumerate(progress(stack, desc="blocks")):
            t0 = time.perf_counter()
            block = model.get_submodule(name)
            ckpt.load(model, name)
            canonicalize(block)
            float_out = _record([], block, ref)[1]
            if i == 0:  # that the blocks chain, checked once against the (float) model itself
                chained, caught = _chained(ref, float_out), _catch(model, model.get_submodule(stack[1]), batches)
                if chained is None or caught is None or not _same(chained, caught):
                    raise ValueError(f"{stack[1]!r} does not take {stack[0]!r}'s output with the same other arguments "
                                     "(something runs between the blocks): this model cannot be quantized block by "
                                     "block; load it and call sk.quantize(model, ...)")
                del chained, caught
                # the tables and the head wait on disk until the last block is done (each quantized block too)
                in_blocks = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                             if any(n.startswith(b + ".") for b in stack)}
                if not in_blocks & {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                                 if not any(n.startswith(b + ".") for b in stack)}:
                    _unload(model, tuple(stack))
                release_memory()
            summary: dict[str, Any] = {}
            if q_block.rounding is not None:
                named: list[Batch] = [_named(block, a, k) for a, k in inputs]
                _, summary = weight_passes(block, q_block, named)
            own = QuantPlan(config=q_block)
            swap_weighted(block, q_block, own, held=False)  # the layers no rounding pass took, to nearest
            # the weights the block's modules hold themselves (expert banks), to nearest, before the next block's
            # inputs are computed (the whole-model sweep rounds them last, after every layer's calibration)
            quantize_held(block, q_block, own)
            if "held_weights" in own.passes:
                held_pass = own.passes["held_weights"]
                held += [f"{name}.{w}" for w in held_pass["weights"]]
            _prefixed(summary, name, plan.passes)
            out = _record([], block, inputs)[1]
            err = relative_error(_head(out[0]), _head(float_out[0]))
            streamed.append({"block": name, "relative_l2": err, "seconds": time.perf_counter() - t0})
            if not err <= _LIMIT:
                raise FidelityError(f"block {name!r} of {ckpt.folder} takes the output far beyond the quantization "
                                    f"noise (relative L2 {err:.3g} against the float block on the first calibration "
                                    f"batch; at most {_LIMIT:g} expected): exclude its layers or report this as a bug")
            nxt, ref_nxt = _chained(inputs, out), _chained(ref, float_out)
            if nxt is None or ref_nxt is None:
                raise ValueError(f"{stack[i + 1] if i + 1 < len(stack) else 'the head'} does not take {name!r}'s output "
                                 "as its hidden states: this model cannot be quantized block by block; load it and call "
                                 "sk.quantize(model, ...)")
            inputs, ref = nxt, ref_nxt
            form = None if isinstance(out[0], Tensor) else tuple(out[0][1:])  # what a block returns beside the hidden states
            del float_out, out, summary
            _offload(block, os.path.join(spill, f"{i}.safetensors"))
            release_memory()
        ckpt.load(model, skip=tuple(stack), missing_only=True)  # the float tables and head, again
        # the layers after the blocks run on the hidden states the sweep has, the blocks passed over (still on disk:
        # memory holds the float tables and head, not the quantized blocks beside them): the float path's through the
        # float head are the float model's output on the first batch; the quantized path's calibrate the head's passes
        with _passed_over(model, stack, first, [_hidden(r) for r in ref], form):
            float_logits = first_tensor(call(model, batches[0])).clone()
        del ref
        release_memory()
        inside = [n for n, m in model.named_modules() if any(n.startswith(s + ".") for s in stack)]
        rest = _without(cfg, inside)
        if rest.rounding is not None:
            with _passed_over(model, stack, first, [_hidden(x) for x in inputs], form):
                model, summary = weight_passes(model, rest, batches)
            _prefixed(summary, "", plan.passes)
            del summary
        del inputs, first
        release_memory()
        for i, name in enumerate(stack):
            _restore(model.get_submodule(name), os.path.join(spill, f"{i}.safetensors"))
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    out_model = _prepare(model, plan, None, None)
    if held:  # in the whole-model plan's place: after the layers and tables
        plan.quantized_layers += held
        plan.passes["held_weights"] = {**held_pass, "weights": held + plan.passes.get("held_weights", {}).get("weights", [])}
    restore(out_model)
    _report(ckpt.skeleton(model_class), out_model, plan, None, inplace=False)  # shares counted on the float skeleton
    logits = first_tensor(call(out_model, batches[0]))
    plan.fidelity_ = {"relative_l2": relative_error(logits, float_logits),
                      "cosine": float(torch.nn.functional.cosine_similarity(
                          logits.double().flatten(), float_logits.double().flatten(), dim=0))}
    plan.passes["streamed"] = {"folder": str(ckpt.folder), "blocks": streamed,
                               "seconds": time.perf_counter() - started, "weights_bytes": ckpt.size_bytes()}
    if not plan.fidelity_["relative_l2"] <= _LIMIT:
        worst = max(streamed, key=lambda s: s["relative_l2"])
        raise FidelityError(f"quantizing {ckpt.folder} block by block changed the model's output far beyond its "
                            f"noise (relative L2 {plan.fidelity_['relative_l2']:.3g}); its blocks' largest departure "
                            f"is {worst['block']!r} ({worst['relative_l2']:.3g})")
    attach(out_model, out_model, plan)
    log.info("quantized %s block by block: %d blocks in %.1f s; output on the first batch: relative L2 %.3g",
             ckpt.folder, len(stack), plan.passes["streamed"]["seconds"], plan.fidelity_["relative_l2"])
    return out_model
