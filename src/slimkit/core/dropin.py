"""Compressed layers that stay drop-ins for the layers they replace.

A compressed layer is built as a subclass of *the user's own layer class* and of slimkit's
implementation (ModelOpt's way): ``isinstance`` checks, attributes (``stride``, ``padding_idx``, a
subclass's own buffers such as a scaled embedding's ``embed_scale``) and a subclass's own ``forward``
survive. The class order puts the user's class first, so a subclass that overrides ``forward`` and
calls ``super().forward`` (Gemma's scaled embedding, OPT's learned positions) reaches slimkit's
forward through ``super()``; a class whose forward is the plain operation runs slimkit's directly.

>>> import torch
>>> from torch import nn
>>> class Scaled(nn.Linear):  # a layer subclass with its own forward and attribute
...     def __init__(self, *a, **k):
...         super().__init__(*a, **k)
...         self.factor = 2.0
...     def forward(self, x):
...         return super().forward(x) * self.factor
>>> class Impl(nn.Linear):
...     def __new__(cls, layer=None, *a, **k):
...         return object.__new__(dropin_class(cls, type(layer)) if layer is not None else cls)
...     def __init__(self, layer):
...         nn.Module.__init__(self)
...         self.register_buffer("w", layer.weight.detach().round())
...         adopt(self, layer, skip=("weight", "bias"))
...     def forward(self, x):
...         return x @ self.w.t()
>>> q = Impl(Scaled(2, 2))
>>> isinstance(q, Scaled), type(q).__name__, q.factor, q.in_features
(True, 'SlimScaled', 2.0, 2)
>>> bool((q(torch.ones(1, 2)) == 2 * q.w.sum(1)).all())
True
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["DropIn", "dropin_class", "adopt", "replace_module", "user_forward"]

_CLASSES: dict[tuple[type, type], type] = {}


def user_forward(cls: type, base: type) -> bool:
    """Whether ``cls`` (a subclass of the torch layer ``base``) defines a ``forward`` of its own."""
    mro = cls.__mro__
    return base not in mro or any("forward" in vars(k) for k in mro[: mro.index(base)])


def dropin_class(impl: type, cls: type, plain_forward: bool = False) -> type:
    """The class a compressed layer of class ``cls`` gets: ``impl`` itself when ``cls`` is the torch
    class ``impl`` derives from, else a subclass of ``cls`` and ``impl`` (cached per pair).
    ``plain_forward`` says that the layer's own forward computes the plain operation (Hugging
    Face's ``Conv1D`` is a Linear with its weight transposed), so ``impl``'s forward replaces it."""
    if cls in impl.__mro__:
        return impl
    key = (impl, cls)
    if key not in _CLASSES:
        body: dict[str, Any] = {"__init__": vars(impl).get("__init__") or impl.__init__,  # type: ignore[misc]
                                "__module__": cls.__module__,
                                "__qualname__": f"Slim{cls.__qualname__}", "slimkit_impl": impl}
        if plain_forward:
            body["forward"] = impl.forward  # type: ignore[attr-defined]
        try:
            _CLASSES[key] = type(f"Slim{cls.__name__}", (cls, impl), body)
        except TypeError as e:  # an inconsistent class order: the layer's class tree conflicts with impl's
            raise ValueError(f"{cls.__name__} cannot be given slimkit's {impl.__name__} as a subclass: {e}") from e
    return _CLASSES[key]


def adopt(new: nn.Module, old: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Give ``new`` what ``old`` has and ``new`` lacks: plain attributes, buffers, parameters and
    submodules (``skip`` names the ones ``new`` holds in another form, e.g. ``weight``), and its
    train/eval mode."""
    held = set(new.__dict__) | set(new._parameters) | set(new._buffers) | set(new._modules) | set(skip)
    for key, value in old.__dict__.items():
        if key not in held and key != "training" and not key.startswith("_slimkit"):
            new.__dict__[key] = value
    for table in ("_parameters", "_buffers", "_modules"):
        for key, value in getattr(old, table).items():
            if key not in held and not hasattr(type(new), key):
                getattr(new, table)[key] = value
                if table == "_buffers" and key in old._non_persistent_buffers_set:
                    new._non_persistent_buffers_set.add(key)
    new.train(old.training)


class DropIn:
    """Mixin for slimkit's layer implementations: ``Impl(layer, ...)`` builds an instance of
    ``dropin_class(Impl, type(layer))``. ``_torch_base`` is the torch layer class the
    implementation stands for; ``_layer_args`` the keyword names the layer may be passed as."""

    _torch_base: type = nn.Module
    _layer_args: tuple[str, ...] = ()

    def __new__(cls, layer: Any = None, *args: Any, **kwargs: Any) -> Any:
        if layer is None:
            layer = next((kwargs[k] for k in cls._layer_args if k in kwargs), None)
        if not isinstance(layer, nn.Module):  # copy.deepcopy, state reconstruction, or plain arguments
            return super().__new__(cls)
        return super().__new__(cls._class_for(layer))

    @classmethod
    def _class_for(cls, layer: nn.Module) -> type:
        original = getattr(layer, "original_class", type(layer))  # a CanonicalLinear's (core/layers.py)
        return dropin_class(cls, original, plain_forward=original is not type(layer)
                            or not user_forward(original, cls._torch_base))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` (dotted; an index inside a ``ModuleList`` or
    ``Sequential``) of ``model`` is, and return the module it replaced. The one place slimkit swaps
    a layer by name: quantization, QAT, factorization, depth pruning and students all use it.

    >>> m = nn.Sequential(nn.Sequential(nn.Linear(1, 1)))
    >>> type(replace_module(m, "0.0", nn.Identity())).__name__, type(m[0][0]).__name__
    ('Linear', 'Identity')
    """
    if not name:
        raise ValueError("the model itself cannot be replaced by name")
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = owner.get_submodule(child)
    setattr(owner, child, new)
    return old
