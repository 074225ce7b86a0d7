"""The chain of plans a compressed model carries, so ``sk.save`` / ``sk.load`` can replay it.

Every verb attaches its plan to the model it returns, after the plans of the model it was given:
factorize then quantize gives ``[FactorPlan, QuantPlan]``, and loading applies them in that order
to a fresh base model. A plan is any object with ``kind`` and ``to_dict()``.

>>> from torch import nn
>>> class P:
...     kind = "demo"
...     def to_dict(self): return {"kind": self.kind}
>>> a, b = nn.Linear(1, 1), nn.Linear(1, 1)
>>> attach(a, nn.Linear(1, 1), P())
>>> attach(b, a, P())
>>> [p.kind for p in plans_of(b)]
['demo', 'demo']
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["plans_of", "attach", "has_plan", "reference_of", "register_plan", "replay"]

# plan kind -> (what it is called in messages, parse a saved dict, rebuild on a fresh base model)
_KINDS: dict[str, tuple[str, Callable[[dict[str, Any]], Any], Callable[[nn.Module, Any], nn.Module]]] = {}


def register_plan(kind: str, what: str, parse: Callable[[dict[str, Any]], Any],
                  rebuild: Callable[[nn.Module, Any], nn.Module]) -> None:
    """Teach ``sk.load`` a plan kind: ``parse`` reads its saved dict, ``rebuild(base, plan)`` returns
    the model's structure rebuilt on ``base`` without data (the weights are loaded after)."""
    _KINDS[kind] = (what, parse, rebuild)


def replay(saved: dict[str, Any], base: nn.Module) -> nn.Module:
    """Rebuild one saved plan on ``base``: the one way every family's plans are applied on load."""
    import slimkit.lowrank.plan  # noqa: F401  (each family registers its kind on import)
    import slimkit.prune.plan  # noqa: F401
    import slimkit.quant.ptq  # noqa: F401

    kind = saved.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown plan kind {kind!r} in the save folder; known: {', '.join(sorted(_KINDS))}")
    what, parse, rebuild = _KINDS[kind]
    try:
        plan = parse(saved)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"the saved {what} plan is invalid: {e}") from e
    return rebuild(base, plan)


def plans_of(model: nn.Module) -> list[Any]:
    plans = getattr(model, "slimkit_plans", None)
    if plans is not None:
        return list(plans)
    single = getattr(model, "slimkit_plan", None)
    return [single] if single is not None else []


def attach(out: nn.Module, source: nn.Module, plan: Any) -> None:
    """Record ``plan`` on ``out`` after the plans ``source`` already carries, and keep a weak
    reference to ``source`` (the model before this verb), which ``reference_of`` returns while the
    caller still holds it: export measures the compression's own noise against it."""
    chain = plans_of(source)
    object.__setattr__(out, "slimkit_plans", [*chain, plan])
    object.__setattr__(out, "slimkit_plan", plan)
    object.__setattr__(out, "_slimkit_reference", weakref.ref(source) if source is not out else None)


def reference_of(model: nn.Module) -> nn.Module | None:
    """The model ``model`` was made from by its last verb, if the caller still holds it."""
    ref = getattr(model, "_slimkit_reference", None)
    return ref() if ref is not None else None


def has_plan(model: nn.Module, kind: str) -> bool:
    return any(getattr(p, "kind", None) == kind for p in plans_of(model))
