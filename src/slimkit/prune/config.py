"""PruneConfig: what to remove, by which importance, and where."""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.core.config import Config, check_choice, check_range

__all__ = ["PruneConfig", "PRESETS", "METHODS", "IMPORTANCE"]

METHODS = ("structured", "unstructured", "nm", "depth")
IMPORTANCE = ("l1", "l2", "taylor")


@dataclass(frozen=True, kw_only=True)
class PruneConfig(Config):
    """Pruning of ``nn.Conv2d`` / ``nn.Linear`` weights.

    - ``method="structured"``: remove whole channels (conv filters, linear neurons) and everything
      coupled to them (BatchNorm, the next layers' inputs, every branch of a residual add, the
      right slice of a concatenation, depthwise convs, flatten into linear), found by tracing the
      model with torch.fx. The result is a smaller dense model. ``round_to`` keeps channel counts
      multiples of 8 or 16 (what SIMD kernels like).
      ``scope="global"`` lets the fraction differ per channel group: one threshold runs over every
      group's scores (normalized to mean 1 per group), so groups whose channels are unequal give up
      more and uniform ones less; each group keeps at least one channel. By default (``scope``
      unset) every group loses the same fraction.
    - ``method="unstructured"``: zero individual weights, one threshold over all chosen layers
      (``scope="global"``, the default) or the same fraction in each (``scope="layer"``).
    - ``method="nm"``: keep the ``n`` largest of every ``m`` consecutive weights along the input
      channels (2:4 by default), the pattern sparse tensor cores run.
    - ``method="depth"``: remove whole blocks whose output has their input's shape (identity-shortcut
      residual blocks), ``sparsity`` being the fraction of those blocks removed; each block is scored
      by how much the outputs change without it, on ``data`` (else ``example_inputs``). See
      ``slimkit.prune.depth``. Fewer layers is what makes small inputs faster.
    - ``sparsity`` is the fraction removed, in [0, 1). ``importance``: ``l1`` or ``l2`` magnitude,
      or ``taylor`` (|weight x gradient|, from ``data``: the cross-entropy's gradient for (inputs,
      labels) batches, that of a random projection of the output for batches of inputs alone).
    - ``recalibrate_bn``: when ``data`` is given, re-estimate every BatchNorm's statistics on it
      after pruning (the cut changes what they normalise; without this, accuracy before
      fine-tuning can fall to chance).
    - ``layers`` limits pruning to these module names; ``exclude`` leaves these alone (for
      structured pruning, their channels are kept, and so are the channels coupled to them).
    """

    method: str = "structured"
    sparsity: float = 0.5
    importance: str = "l1"
    scope: str | None = None
    round_to: int = 1
    n: int = 2
    m: int = 4
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    recalibrate_bn: bool = True

    def validate(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("importance", self.importance, IMPORTANCE)
        check_choice("scope", self.scope, (None, "global", "layer"))
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=self.method != "depth")  # depth: 1 = every removable block
        check_range("round_to", self.round_to, 1, 1024)
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int):
            raise ValueError(f"round_to must be an integer, got {self.round_to!r}")
        for k in ("n", "m"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if self.n >= self.m:
            raise ValueError(f"n:m sparsity keeps n of every m weights and needs n < m, got {self.n}:{self.m}")
        if not isinstance(self.recalibrate_bn, bool):
            raise ValueError(f"recalibrate_bn must be true or false, got {self.recalibrate_bn!r}")
        for k in ("layers", "exclude"):
            if not all(isinstance(x, str) for x in getattr(self, k)):
                raise ValueError(f"{k} must be module names, got {getattr(self, k)!r}")


# Named configs for ``sk.prune(model, name, ...)``; ``sk.presets("prune")`` lists them.
PRESETS: dict[str, PruneConfig] = {
    "channels-50": PruneConfig(method="structured", sparsity=0.5, importance="l1", round_to=8),
    "unstructured-80": PruneConfig(method="unstructured", sparsity=0.8, scope="global"),
    "2:4": PruneConfig(method="nm", n=2, m=4),
}
