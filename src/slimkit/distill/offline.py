"""Offline distillation: a frozen teacher trains a student through the shared loop (``train.fit``)."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.batch import call, check_batches, model_inputs, modes_kept, tensors_of

from .config import DistillConfig
from .features import FeatureKD

__all__ = ["distill_offline"]


def distill_offline(student: nn.Module, teacher: nn.Module, train_data: Sequence[Any], cfg: DistillConfig,
                    inplace: bool = False, checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    from slimkit.train import fit  # the loop sits above the families' losses; imported when used

    data = check_batches(train_data, "train_data")
    first = data[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise ValueError("train_data: distillation needs (inputs, labels) batches (alpha=1 ignores the labels)")
    x = model_inputs(first)
    s = student if inplace else copy.deepcopy(student)
    with modes_kept(s, teacher), torch.no_grad():
        so, to = tensors_of(call(s.eval(), x)), tensors_of(call(teacher.eval(), x))
    if [t.shape for t in so] != [t.shape for t in to]:
        raise ValueError(f"student outputs {[tuple(t.shape) for t in so]} and teacher outputs "
                         f"{[tuple(t.shape) for t in to]} differ in shape; they must predict the same classes")
    kd = FeatureKD(s, teacher, cfg.hints, example_inputs=x, loss=cfg.feature_loss,
                   weight=cfg.feature_weight) if cfg.hints else None
    try:
        fit(s, data, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, teacher=teacher,
            temperature=cfg.temperature, alpha=cfg.alpha, optimizer=cfg.optimizer, extra_loss=kd, checkpoint=checkpoint)
    finally:
        if kd is not None:
            kd.close()
    return s
