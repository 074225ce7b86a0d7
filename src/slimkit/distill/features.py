"""Feature-based distillation (FitNets, Romero et al. 2015): chosen student layers ("hints") learn to
reproduce chosen teacher layers' outputs, through a learned adapter where the widths differ
(a 1x1 conv for [N, C, H, W] features, a Linear on the last dimension otherwise).

``FeatureKD`` hooks both models, so it works inside any training loop: after the student's and
the teacher's forward passes on the same batch, ``feature_kd()`` returns the summed MSE (or
1 - cosine) over the pairs. Its adapters are parameters: optimise them with the student (``fit``
does when it is given as ``extra_loss``). ``close()`` (or leaving a ``with FeatureKD(...) as kd:``
block) removes the hooks from both models.

>>> import torch
>>> from torch import nn
>>> t = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> s = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> kd = FeatureKD(s, t, {"1": "1"}, example_inputs=torch.randn(2, 4))
>>> kd.adapters["1"]
Linear(in_features=3, out_features=8, bias=True)
>>> _ = s(torch.randn(5, 4)); _ = t(torch.randn(5, 4))
>>> kd().shape
torch.Size([])
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.batch import Batch, call, modes_kept

__all__ = ["FeatureKD"]


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=1)
        raise ValueError(f"the {role} has no layer named {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return modules[name]


class FeatureKD(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Mapping[str, str], example_inputs: Batch,
                 loss: str = "mse", weight: float = 1.0) -> None:
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {loss!r}")
        if not pairs:
            raise ValueError("pairs is empty: name at least one student layer and the teacher layer it should match")
        if not weight > 0:
            raise ValueError(f"weight must be above 0, got {weight}")
        self.loss, self.weight, self.pairs = loss, float(weight), dict(pairs)
        self._s: dict[str, Tensor] = {}
        self._t: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        try:
            self._setup(student, teacher, example_inputs)
        except BaseException:
            self.close()  # a failed set-up leaves no hook behind on the caller's models
            raise
        self._s.clear()
        self._t.clear()

    def _setup(self, student: nn.Module, teacher: nn.Module, example_inputs: Batch) -> None:
        for s_name, t_name in self.pairs.items():
            self._handles.append(_module(student, s_name, "student").register_forward_hook(self._keep(self._s, s_name)))
            self._handles.append(_module(teacher, t_name, "teacher").register_forward_hook(self._keep(self._t, t_name)))
        with modes_kept(student, teacher), torch.no_grad():
            call(student.eval(), example_inputs)
            call(teacher.eval(), example_inputs)
        self.adapters = nn.ModuleDict()
        for s_name, t_name in self.pairs.items():
            for store, name, role in ((self._s, s_name, "student"), (self._t, t_name, "teacher")):
                if name not in store:
                    raise ValueError(f"the {role}'s layer {name!r} did not return a tensor on the example inputs; "
                                     "pick another hint layer")
            s, t = self._s[s_name], self._t[t_name]
            if s.dim() != t.dim() or (s.dim() == 4 and s.shape[2:] != t.shape[2:]) or (s.dim() == 3 and s.shape[1] != t.shape[1]):
                raise ValueError(f"pair {s_name!r} -> {t_name!r}: student features {tuple(s.shape)} and teacher features "
                                 f"{tuple(t.shape)} differ in more than their width")
            cs, ct = (s.shape[1], t.shape[1]) if s.dim() == 4 else (s.shape[-1], t.shape[-1])
            key = s_name.replace(".", "_")
            if s.dim() == 4:
                self.adapters[key] = nn.Conv2d(cs, ct, 1) if cs != ct else nn.Identity()
            else:
                self.adapters[key] = nn.Linear(cs, ct) if cs != ct else nn.Identity()
        self._s.clear()
        self._t.clear()

    def __enter__(self) -> FeatureKD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _keep(store: dict[str, Tensor], name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):  # (tracers pass proxies through; those are not features)
                store[name] = output
        return hook

    def forward(self) -> Tensor:
        """The feature loss for the latest student and teacher forward passes."""
        total: Tensor | None = None
        for s_name, t_name in self.pairs.items():
            if s_name not in self._s or t_name not in self._t:
                raise RuntimeError(f"no features captured for {s_name!r} -> {t_name!r}: run the student and the "
                                   "teacher on the batch first")
            s = self.adapters[s_name.replace(".", "_")](self._s[s_name])
            t = self._t[t_name].detach()
            if self.loss == "mse":
                term = F.mse_loss(s, t)
            else:
                dim = 1 if s.dim() == 4 else -1
                term = (1 - F.cosine_similarity(s, t, dim=dim)).mean()
            total = term if total is None else total + term
        assert total is not None
        return self.weight * total

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._s.clear()
        self._t.clear()
