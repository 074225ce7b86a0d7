"""Layer types that are another layer in disguise, and how slimkit sees them.

Hugging Face's ``Conv1D`` (the GPT-2 family) is a Linear layer whose weight is stored transposed,
``[in, out]``, computing ``x @ W + b``. While a verb works, such a layer is held as a
``CanonicalLinear`` (an ``nn.Linear`` with the weight ``[out, in]``), so every pass treats it as the
Linear it is; afterwards a compressed one becomes a subclass of the user's class (``core/dropin.py``)
whose ``weight`` reads in the original layout, and one left alone is restored as it was.

Teach slimkit another such type with ``register_linear_like(predicate)``:

>>> import torch
>>> from torch import Tensor, nn
>>> class RowMajor(nn.Module):  # a user's layer: y = x @ W + b, W stored [in, out]
...     def __init__(self):
...         super().__init__()
...         self.weight, self.bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.zeros(3))
...     def forward(self, x):
...         return x @ self.weight + self.bias
>>> forget = register_linear_like(lambda m: isinstance(m, RowMajor))
>>> model = nn.Sequential(RowMajor())
>>> canonicalize(model)
['0']
>>> type(model[0]).__name__, tuple(model[0].weight.shape)
('CanonicalLinear', (3, 4))
>>> restore(model)
>>> type(model[0]).__name__, tuple(model[0].weight.shape)
('RowMajor', (4, 3))
>>> forget()  # registrations are global: a test takes its own back
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from slimkit.core.dropin import adopt, replace_module

__all__ = ["CanonicalLinear", "register_linear_like", "canonicalize", "restore", "is_hf_conv1d", "is_linear_like", "in_own_layout", "tied_weights"]


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (recognized without importing it)."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(w, nn.Parameter) and w.dim() == 2


_LINEAR_LIKE: list[Callable[[nn.Module], bool]] = [is_hf_conv1d]


def in_own_layout(layer: nn.Module, w: Tensor) -> Tensor:
    """An ``[out, in]`` weight as ``layer`` exposes it: transposed for a layer made from a
    linear-like one (``weight_layout == "in_out"``), as it is otherwise."""
    return w.t() if getattr(layer, "weight_layout", "out_in") == "in_out" else w


def is_linear_like(m: nn.Module) -> bool:
    """Whether ``m`` is a registered linear-like layer (``[in, out]`` weight), such as HF's ``Conv1D``."""
    return not isinstance(m, nn.Linear) and any(p(m) for p in _LINEAR_LIKE)


def register_linear_like(predicate: Callable[[nn.Module], bool]) -> Callable[[], None]:
    """Treat modules for which ``predicate`` holds as Linear layers with a ``[in, out]`` weight
    parameter and an optional ``bias`` parameter, computing ``x @ weight + bias``. Returns a
    function that takes the registration back."""
    if predicate not in _LINEAR_LIKE:
        _LINEAR_LIKE.append(predicate)

    def forget() -> None:
        if predicate in _LINEAR_LIKE:
            _LINEAR_LIKE.remove(predicate)

    return forget


class CanonicalLinear(nn.Linear):
    """A linear-like layer held as ``nn.Linear`` while a verb works (see the module doc)."""

    fx_leaf = True  # one call under torch.fx, as nn.Linear is (core/graph.py)

    def __init__(self, layer: nn.Module) -> None:
        nn.Module.__init__(self)
        w = layer.weight
        assert isinstance(w, nn.Parameter)
        self.in_features, self.out_features = int(w.shape[0]), int(w.shape[1])
        self.weight = nn.Parameter(w.detach().t(), requires_grad=w.requires_grad)
        self.bias = layer.bias if isinstance(layer.bias, nn.Parameter) else None  # type: ignore[assignment]
        self.weight_layout = "in_out"  # adopted by the compressed layer built from this one
        object.__setattr__(self, "_slimkit_original", layer)  # not a submodule: outside the state dict
        adopt(self, layer, skip=("weight", "bias"))

    @property
    def original_class(self) -> type:
        return type(self.__dict__["_slimkit_original"])

    def restored(self) -> nn.Module:
        """The original layer, carrying this one's (possibly changed) weights."""
        layer: nn.Module = self.__dict__["_slimkit_original"]
        layer.weight = nn.Parameter(self.weight.detach().t(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            layer.bias = self.bias
        if isinstance(getattr(layer, "nf", None), int):  # HF's Conv1D: its output width (pruning changes it)
            setattr(layer, "nf", self.out_features)  # noqa: B010
        return layer


def canonicalize(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace, in place, every linear-like layer of ``model`` (but those under a module of ``skip``)
    by a ``CanonicalLinear``; returns their names."""
    names = [n for n, m in model.named_modules() if n and any(p(m) for p in _LINEAR_LIKE)
             and not any(n.startswith(s + ".") for s in skip)]
    for name in names:
        replace_module(model, name, CanonicalLinear(model.get_submodule(name)))
    return names


def restore(model: nn.Module) -> None:
    """Put back, in place, the original class of every ``CanonicalLinear`` still in ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, CanonicalLinear):
            replace_module(model, name, m.restored())


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """For each module whose ``weight`` parameter another module holds too (a language model's
    output layer tied to its embedding table), the other holders' names.

    >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    >>> head.weight = emb.weight
    >>> tied_weights(nn.ModuleDict({"emb": emb, "head": head}))
    {'emb': ['head'], 'head': ['emb']}
    """
    holders: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight")
        if w is not None and name not in holders.get(id(w), []):
            holders.setdefault(id(w), []).append(name)
    return {n: [o for o in names if o != n] for names in holders.values() if len(names) > 1 for n in names}
