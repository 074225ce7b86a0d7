"""The layer swap of post-training quantization: each Linear/Conv replaced by its quantized drop-in
(``QuantLinear``, ``QuantConv``, ``QuantLinearNBits``, ``QuantLinearNF4``), embedding tables (the ``Embeddings`` pass)
and the weights modules hold themselves (``param_weights.py``), each choice recorded in the plan."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import nn

from slimkit.quant.modules import WEIGHTED_LAYERS as _WEIGHTED
from slimkit.quant.modules import QuantConv, QuantLinear
from slimkit.quant.nf4 import QuantLinearNF4
from slimkit.quant.param_weights import quantize_held_weights
from slimkit.quant.passes import Embeddings, Quantize, handler_of, pass_handler
from slimkit.quant.weight_only import QuantEmbedding, QuantLinearNBits

if TYPE_CHECKING:
    from slimkit.quant.ptq import QuantPlan

__all__ = ["swap_weighted", "quantize_held"]

log = logging.getLogger(__name__)


def _parents(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` read as the swap goes: no list of them holds a float layer after
    its quantized drop-in took its place (a 32000-token output head is a quarter of a GB)."""
    for name in [n for n, _ in model.named_modules()]:
        try:
            yield name, model.get_submodule(name)
        except AttributeError:  # under a layer swapped already
            continue


def _children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for child_name in list(module._modules):
        child = module._modules[child_name]
        if child is not None:
            yield child_name, child


def swap_weighted(model: nn.Module, passes: Quantize, plan: QuantPlan, held: bool = True) -> None:
    """Replace Linear/Conv modules by their quantized versions, in place, recording the choice;
    ``held``: then the weights modules hold themselves (``quantize_held``)."""
    cfg = passes.weights
    dynamic = passes.activations.mode == "dynamic"
    fmt = cfg.format if cfg.format.startswith("fp8") else "int"
    owners: dict[int, list[str]] = {}  # parameter -> modules holding it (tied embeddings), before any swap
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname.rpartition(".")[0])
    names = {n for n, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    unknown = sorted(set(cfg.layer_bits) - names)
    if unknown:
        raise ValueError(f"layer_bits names layers this model does not have: {unknown[:5]}; "
                         f"its Linear/Conv layers are {sorted(names)[:8]}")
    for name, module in _parents(model):
        for child_name, child in _children(module):
            full = f"{name}.{child_name}" if name else child_name
            # replaced by a weight pass already (GPTQ, SmoothQuant)
            if isinstance(child, (QuantLinearNBits, QuantLinearNF4, QuantLinear, QuantConv)):
                plan.quantized_layers.append(full)
                continue
            if not isinstance(child, _WEIGHTED):
                continue
            if full in cfg.exclude:
                plan.skipped[full] = "excluded by config"
                continue
            if isinstance(child, nn.Conv1d) and dynamic:
                plan.skipped[full] = "dynamic quantization supports Conv2d and Linear"
                continue
            bits = cfg.bits_for(full, child)
            if cfg.group_size is not None:
                if not isinstance(child, nn.Linear):
                    plan.skipped[full] = "group-wise weight-only quantization covers Linear layers"
                    continue
                try:
                    grouped: nn.Module = (QuantLinearNF4(child, cfg.group_size) if cfg.format == "nf4"
                                          else QuantLinearNBits(child, bits, cfg.group_size, cfg.symmetric))
                except ValueError as e:
                    plan.skipped[full] = str(e)
                    continue
                setattr(module, child_name, grouped)
                plan.quantized_layers.append(full)
                continue
            try:
                q: nn.Module = (
                    QuantLinear(child, bits, dynamic=dynamic, per_channel=cfg.per_channel, fmt=fmt)
                    if isinstance(child, nn.Linear)
                    else QuantConv(child, bits, dynamic=dynamic, per_channel=cfg.per_channel, fmt=fmt)
                )
            except ValueError as e:
                plan.skipped[full] = str(e)
                continue
            setattr(module, child_name, q)
            plan.quantized_layers.append(full)
    for step in passes.of_stage("convert"):
        handler_of(step)(model, step, plan, owners)
    if held:
        quantize_held(model, passes, plan)
    for full, why in plan.skipped.items():
        log.info("kept in float: %s (%s)", full, why)


def quantize_held(model: nn.Module, passes: Quantize, plan: QuantPlan) -> None:
    """The weights a module holds itself (expert banks, ``in_proj_weight``), on the ``Weights`` grid."""
    cfg = passes.weights
    if cfg.format.startswith("fp8"):  # held weights are int8 rows or groups: say so rather than mix formats
        from slimkit.quant.param_weights import quantizable_parameters

        for mname, pnames in quantizable_parameters(model, set(plan.quantized_layers)).items():
            for p in pnames:
                plan.skipped[f"{mname}.{p}" if mname else p] = (
                    f"a weight the module holds itself stays float with {cfg.format} (FP8 covers Linear/Conv layers)")
        return
    if cfg.group_size is not None or cfg.bits == 8:
        held = quantize_held_weights(model, set(plan.quantized_layers), cfg.exclude, bits=cfg.bits,
                                     group_size=cfg.group_size, symmetric=cfg.symmetric, skipped=plan.skipped,
                                     fmt="nf4" if cfg.format == "nf4" else "int")
        plan.quantized_layers += held
        if held:  # the rounding passes reconstruct layers from their inputs; a held weight has no layer input
            rounding = passes.rounding
            plan.passes["held_weights"] = {
                "weights": held, "rounding": "nearest",
                "why": (f"{type(rounding).__name__} reconstructs Linear/Conv layers from their inputs; weights a "
                        "module holds itself (expert banks) are rounded to nearest") if rounding is not None
                else "round to nearest"}


@pass_handler(Embeddings)
def _swap_embeddings(model: nn.Module, cfg: Embeddings, plan: QuantPlan, owners: dict[int, list[str]]) -> None:
    bits = cfg.bits
    for name, module in _parents(model):
        for child_name, child in _children(module):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Embedding) or isinstance(child, QuantEmbedding):
                continue
            # a table tied to a layer that stays float keeps the tie (one shared table in the file);
            # tied to a layer that was quantized, the two are apart already and the table is quantized too
            others = [o for o in owners.get(id(child.weight), []) if o != full and o not in plan.quantized_layers]
            if others:
                plan.skipped[full] = (f"its weight is tied to {others[0]!r}, which stays float; quantizing it apart "
                                      "would untie them")
                continue
            try:
                if bits == 4 and child.embedding_dim % 32:
                    # 4-bit rows go in groups of 32; a table of another width still halves as int8 rows
                    setattr(module, child_name, QuantEmbedding(child, 8))
                    plan.passes.setdefault("embeddings", {})[full] = (
                        f"8-bit rows: its width {child.embedding_dim} is not a multiple of the 4-bit groups of 32")
                else:
                    setattr(module, child_name, QuantEmbedding(child, bits))
            except ValueError as e:
                plan.skipped[full] = str(e)
                continue
            plan.quantized_layers.append(full)
