"""The low-rank config: which decomposition, how much rank, where.

>>> FactorizeConfig(method="svd", energy=0.95).to_dict()["energy"]
0.95
>>> FactorizeConfig(method="svd")
Traceback (most recent call last):
...
ValueError: give exactly one of rank, energy or ratio (got none)
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.core.config import Config, check_choice, check_range

__all__ = ["FactorizeConfig", "PRESETS", "METHODS"]

METHODS = ("svd", "spatial-svd", "tucker", "cp")


@dataclass(frozen=True, kw_only=True)
class FactorizeConfig(Config):
    """Low-rank decomposition of Linear layers and 1x1 convolutions (``svd``) or k x k
    convolutions (``spatial-svd``, ``tucker``, ``cp``).

    - exactly one of ``rank`` (an explicit rank; for Tucker, the rank of both channel modes, capped
      at each mode's size), ``energy`` (keep this fraction of the squared singular values, per
      mode for Tucker; not for CP) or ``ratio`` (keep this fraction of each layer's parameters).
    - ``allocation="global"`` (with ``ratio``): ``ratio`` becomes a budget over all the chosen
      layers together, and ranks are allocated per layer by measured sensitivity (output error
      on ``data`` when given, weight error otherwise).
    - ``layers``: module names to factorize (default: every layer the method applies to). A
      named layer the method cannot take is an error; an unnamed one is skipped and reported.
    - ``iterations``: HOOI sweeps (Tucker) or ALS sweeps (CP).
    - ``whiten`` (svd only; needs ``data``): data-whitened SVD, optimal for each layer's outputs on
      the data rather than for its weights (see ``slimkit.lowrank.whitened_svd``); ``energy`` then
      counts output energy. Much better on transformers, whose inputs are far from isotropic.
    """

    method: str = "svd"
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    allocation: str = "uniform"
    layers: tuple[str, ...] = ()
    iterations: int = 25
    whiten: bool = False

    def validate(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("allocation", self.allocation, ("uniform", "global"))
        given = [k for k in ("rank", "energy", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, energy or ratio (got {', '.join(given) or 'none'})")
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"rank must be an integer of at least 1, got {self.rank!r}")
        if self.energy is not None:
            check_range("energy", self.energy, 0.0, 1.0, lo_open=True)
            if self.method == "cp":
                raise ValueError("energy is not defined for CP (its factors are not orthogonal); give rank or ratio")
        if self.ratio is not None:
            check_range("ratio", self.ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.allocation == "global" and self.ratio is None:
            raise ValueError("allocation='global' needs ratio (the parameter budget over all chosen layers)")
        check_range("iterations", self.iterations, 0, 10_000)
        if not isinstance(self.whiten, bool):
            raise ValueError(f"whiten must be true or false, got {self.whiten!r}")
        if self.whiten and self.method != "svd":
            raise ValueError(f"whiten applies to method 'svd', not {self.method!r}")
        if not all(isinstance(n, str) for n in self.layers):
            raise ValueError(f"layers must be module names, got {self.layers!r}")


# Named configs for ``sk.factorize(model, name, ...)``; ``sk.presets("factorize")`` lists them.
PRESETS: dict[str, FactorizeConfig] = {
    "svd-50": FactorizeConfig(method="svd", ratio=0.5),
    "svd-whitened-50": FactorizeConfig(method="svd", ratio=0.5, whiten=True),
}
