"""The verbs: ``quantize``, ``qat``, ``prune``, ``factorize``, ``distill``, and ``presets``.

``import slimkit as sk`` gives them as ``sk.quantize`` and so on. ``sk.prune`` and ``sk.distill`` are
also the packages ``slimkit.prune`` and ``slimkit.distill``: calling the package calls the verb, and
its names (``slimkit.prune.GradualPruning``) stay reachable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from slimkit.core.batch import Batch, calibration_batches
from slimkit.core.config import handler_for
from slimkit.distill import (
    DistillConfig,
    distill_exits,
    distill_generations,
    distill_offline,
    distill_online,
)
from slimkit.lowrank import FactorizeConfig
from slimkit.prune import PruneConfig
from slimkit.quant import Quantize, resolve_quantize
from slimkit.quant.qat import QATConfig
from slimkit.quant.qat import qat as _qat
from slimkit.verbs import resolve_config

__all__ = ["quantize", "qat", "prune", "factorize", "distill", "presets", "qat_presets"]


def presets(verb: str = "quantize") -> dict[str, dict[str, Any]]:
    """The named configs ``verb`` (``quantize``, ``qat``, ``prune``, ``factorize``, ``distill``, or
    ``sparse_train``) accepts in place of a config, as ``{name: config dict}``."""
    from slimkit.verbs import PRESET_TABLES

    if verb not in PRESET_TABLES:
        raise ValueError(f"presets are listed per verb: one of {', '.join(PRESET_TABLES)}; got {verb!r}")
    return {name: cfg.to_dict() for name, cfg in sorted(PRESET_TABLES[verb][1].items())}


def qat_presets() -> dict[str, dict[str, Any]]:
    """The presets ``sk.qat`` accepts, as ``{name: config dict}``."""
    return presets("qat")


def quantize(model: nn.Module | str | os.PathLike[str],
             config: Quantize | Sequence[Any] | Mapping[str, Any] | str = "int8",
             calib_data: Iterable[Batch] | None = None, inplace: bool = False) -> nn.Module:
    """Quantize ``model`` with a preset name or a list of passes, run in order: pass configs
    (``Weights(bits=4, group_size=128)``, ``GPTQ()``, ...), their names (``"gptq"``) or one-key dicts
    (``{"gptq": {"damp": 0.02}}``); a ``Quantize`` or ``{"passes": [...]}`` too. The old flat
    ``QuantConfig`` (or its dict) still works, with a ``DeprecationWarning`` showing the list.

    Static activations (``int8``) need ``calib_data``: an iterable of batches the model is called
    with. Returns a new model; the caller's model is untouched unless ``inplace=True``.

    ``model`` may be a Hugging Face model folder (``config.json`` and safetensors shards) in place
    of a model: it is then quantized one block at a time, loading each block's weights from the
    shards, so memory holds one float block, not the whole model (``quant/streaming.py``; weight-only
    and dynamic presets, with ``calib_data``).

    >>> import torch
    >>> from slimkit.quant import Activations, Weights
    >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> q = quantize(m, [Weights(bits=4, group_size=32, reduce_range=False), Activations(mode="none")])
    >>> q.slimkit_plan.quantized_layers
    ['0', '2']
    """
    cfg = resolve_quantize(config)
    if isinstance(model, (str, os.PathLike)):
        from slimkit.quant.streaming import quantize_checkpoint

        if inplace:
            raise ValueError("inplace=True changes a model in memory; a model folder is read, never changed")
        return quantize_checkpoint(model, cfg, calib_data)
    if calib_data is not None:  # (inputs, labels) pairs: the inputs, said once
        calib_data = calibration_batches(model, calib_data, "calib_data")
    return handler_for(cfg)(model, cfg, calib_data=calib_data, inplace=inplace)


def qat(model: nn.Module, config: QATConfig | Mapping[str, Any] | str, train_data: Iterable[Batch],
        calib_data: Iterable[Batch] | None = None, inplace: bool = False,
        evaluate: Callable[[nn.Module], float] | None = None, checkpoint: str | None = None) -> nn.Module:
    """Quantization-aware training: ``"int8"``, ``"w4a8"``, ``"w4a8-lsq"``, ``"w4a8-pact"`` or a
    ``QATConfig`` (or its dict). Fine-tunes a copy of ``model`` on ``(inputs, labels)`` batches with
    fake quantization, starting from PTQ's calibrated ranges (``calib_data``, else the first training
    inputs), and returns the integer model, which ``sk.export_onnx`` writes as integer ONNX.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> data = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(4)]
    >>> q = qat(m, "w4a8", data)
    >>> q.slimkit_plan.passes["qat"]["method"], int(q.get_submodule("0").weight_q.abs().max())
    ('ste', 7)
    """
    cfg = resolve_config("qat", config)
    return _qat(model, cfg, train_data, calib_data, inplace=inplace, evaluate=evaluate, checkpoint=checkpoint)


def factorize(model: nn.Module, config: FactorizeConfig | Mapping[str, Any] | str, data: Iterable[Batch] | None = None,
              metric: Callable[[nn.Module], float] | None = None, inplace: bool = False) -> nn.Module:
    """Low-rank decomposition: ``{"method": "svd" | "spatial-svd" | "tucker" | "cp", ...}`` with
    one of ``rank``, ``energy`` or ``ratio`` (see ``FactorizeConfig``).

    Linear layers become ``nn.Sequential`` of two ``nn.Linear``; convs become sequences of
    ``nn.Conv2d``. With ``allocation="global"``, ``data`` batches (or a ``metric``, higher is
    better) measure each layer's sensitivity. The plan is ``result.slimkit_plan``.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> f = factorize(m, {"method": "svd", "ratio": 0.5})
    >>> f.slimkit_plan.ranks_
    {'0': [16], '2': [4]}
    """
    cfg = resolve_config("factorize", config)
    if data is not None:
        data = calibration_batches(model, data, "data")
    return handler_for(cfg)(model, cfg, data=data, metric=metric, inplace=inplace)


def prune(model: nn.Module, config: PruneConfig | Mapping[str, Any] | str, example_inputs: Batch | None = None,
          data: Iterable[Batch] | None = None, inplace: bool = False) -> nn.Module:
    """Pruning: ``{"method": "structured" | "unstructured" | "nm", "sparsity": ..., ...}`` (see
    ``PruneConfig``). Structured pruning traces the model with ``example_inputs`` and returns a
    physically smaller model; unstructured and N:M zero weights in place of the copy. ``data``
    (``(inputs, labels)`` batches) feeds the ``taylor`` importance. The plan is ``result.slimkit_plan``.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> p = prune(m, {"method": "structured", "sparsity": 0.5}, example_inputs=torch.randn(2, 16))
    >>> p[0].weight.shape, p[2].weight.shape
    (torch.Size([16, 16]), torch.Size([4, 16]))
    """
    cfg = resolve_config("prune", config)
    return handler_for(cfg)(model, cfg, example_inputs=example_inputs, data=data, inplace=inplace)


def distill(student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None, train_data: Iterable[Batch],
            config: DistillConfig | Mapping[str, Any] | str | None = None, inplace: bool = False,
            checkpoint: str | None = None) -> nn.Module:
    """Train a copy of ``student`` on ``(inputs, labels)`` batches by distillation; returns it.

    - ``mode="offline"`` (default): ``teacher`` (frozen, eval mode, no_grad) teaches with ``KDLoss``
      and optional hint layers.
    - ``mode="online"``: ``teacher`` is one peer or a list of peers, trained with the student by deep
      mutual learning (the peers are copies too; ``slimkit.distill.distill_online`` returns them all).
    - ``mode="self"`` with ``teacher=None``: with ``exits``, an ``EarlyExit`` model whose
      intermediate exits learned from its last output; without, ``generations`` born-again copies.

    ``checkpoint`` makes an interrupted run resumable.

    >>> import torch
    >>> t = torch.nn.Linear(4, 3)
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> s = distill(torch.nn.Linear(4, 3), t, data, {"epochs": 2, "lr": 0.1})
    >>> s.weight.shape
    torch.Size([3, 4])
    """
    cfg = resolve_config("distill", config if config is not None else {})
    data = list(train_data)
    if cfg.mode == "self":
        if teacher is not None:
            raise ValueError("mode='self': the network teaches itself; pass teacher=None")
        run = distill_exits if cfg.exits else distill_generations
        return run(student, data, cfg, inplace=inplace, checkpoint=checkpoint)
    if teacher is None:
        raise ValueError(f"mode={cfg.mode!r} needs a teacher (offline) or peers (online); "
                         "for self-distillation use mode='self'")
    if cfg.mode == "online":
        peers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        return distill_online([student, *peers], data, cfg, inplace=inplace, checkpoint=checkpoint)[0]
    if not isinstance(teacher, nn.Module):
        raise ValueError("mode='offline' takes one teacher module; a list of peers is for mode='online'")
    return distill_offline(student, teacher, data, cfg, inplace=inplace, checkpoint=checkpoint)
