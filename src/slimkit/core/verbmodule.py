"""A package that is also a verb: ``slimkit.prune`` is the pruning package, and calling it calls
``slimkit.api.prune``. Without this, the verb ``sk.prune`` would shadow the package, and
``slimkit.prune.GradualPruning`` would be an attribute error.

>>> import types
>>> pkg = types.ModuleType("pkg", "a package")
>>> def verb(x: int) -> int:
...     "double x"
...     return 2 * x
>>> callable_package(pkg, verb)
>>> pkg(21), pkg.__name__
(42, 'pkg')
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

__all__ = ["callable_package"]


class _VerbPackage(types.ModuleType):
    """A module whose call is its verb (``inspect.signature`` follows ``__wrapped__`` to it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__wrapped__"](*args, **kwargs)


def callable_package(module: types.ModuleType, verb: Callable[..., Any]) -> None:
    """Make ``module(...)`` call ``verb``; its docstring says so."""
    module.__class__ = _VerbPackage
    module.__wrapped__ = verb  # type: ignore[attr-defined]
    note = (f"\n\nCalled as a function, ``{module.__name__}(...)`` is the verb "
            f"``{verb.__module__}.{verb.__name__}``.")
    if module.__doc__ and note not in module.__doc__:
        module.__doc__ += note
