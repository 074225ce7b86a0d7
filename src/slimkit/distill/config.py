"""DistillConfig: offline, online (mutual) and self distillation, in the shared loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimkit.core.config import Config, check_choice, check_range

__all__ = ["DistillConfig", "PRESETS"]


@dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """- ``mode``: "offline" (a frozen teacher), "online" (deep mutual learning: the student and its
      peers teach each other) or "self" (the network teaches itself: its intermediate ``exits``
      learn from its last output, or, without exits, ``generations`` of born-again training).
    - ``temperature`` and ``alpha``: the response loss ``KDLoss`` (alpha weighs the soft term).
    - ``hints``: ``{student layer: teacher layer}`` for feature distillation (``FeatureKD``, with
      ``feature_loss`` "mse" or "cosine" weighted by ``feature_weight``); empty for none.
    - ``exits`` (self mode): layer names that get an early-exit classifier; ``exit_threshold`` the
      top softmax probability at which an input leaves there at run time.
    - ``generations`` (self mode without exits): how many born-again generations to train.
    - ``epochs``, ``lr``, ``optimizer`` ("sgd" or "adamw"), ``weight_decay``, ``seed``: the loop's.
    """

    mode: str = "offline"
    temperature: float = 4.0
    alpha: float = 0.5
    hints: dict[str, str] = field(default_factory=dict)
    feature_loss: str = "mse"
    feature_weight: float = 1.0
    exits: tuple[str, ...] = ()
    exit_threshold: float = 0.9
    generations: int = 1
    epochs: int = 5
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    seed: int = 0

    def validate(self) -> None:
        check_choice("mode", self.mode, ("offline", "online", "self"))
        if isinstance(self.exits, list):
            object.__setattr__(self, "exits", tuple(self.exits))
        if isinstance(self.exits, str) or not all(isinstance(e, str) and e for e in self.exits):
            raise ValueError(f"exits must be a list of layer names, got {self.exits!r}")
        if self.exits and self.mode != "self":
            raise ValueError(f"exits are for mode='self', not mode={self.mode!r}")
        check_range("exit_threshold", self.exit_threshold, 0.0, 1.0)
        for name in ("generations", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        check_range("temperature", self.temperature, 0.0, 1e6, lo_open=True)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_choice("feature_loss", self.feature_loss, ("mse", "cosine"))
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))
        check_range("feature_weight", self.feature_weight, 0.0, 1e6, lo_open=True)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        if not isinstance(self.hints, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.hints.items()):
            raise ValueError(f"hints must map student layer names to teacher layer names, got {self.hints!r}")

    def __hash__(self) -> int:  # a dict field: hash what identifies the config
        return hash((self.mode, self.temperature, self.alpha, tuple(sorted(self.hints.items())), self.exits,
                     self.epochs, self.lr))


# Named configs for ``sk.distill(student, teacher, data, name)``; ``sk.presets("distill")`` lists them.
PRESETS: dict[str, DistillConfig] = {
    "kd": DistillConfig(),
    "mutual": DistillConfig(mode="online"),
}
