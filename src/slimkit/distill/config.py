"""DistillConfig: offline distillation of a student from a frozen teacher, in the shared loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimkit.core.config import Config, check_choice, check_range

__all__ = ["DistillConfig"]


@dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """- ``temperature`` and ``alpha``: the response loss ``KDLoss`` (alpha weighs the soft term).
    - ``hints``: ``{student layer: teacher layer}`` for feature distillation (``FeatureKD``, with
      ``feature_loss`` "mse" or "cosine" weighted by ``feature_weight``); empty for none.
    - ``epochs``, ``lr``, ``optimizer`` ("sgd" or "adamw"), ``weight_decay``, ``seed``: the loop's.
    """

    temperature: float = 4.0
    alpha: float = 0.5
    hints: dict[str, str] = field(default_factory=dict)
    feature_loss: str = "mse"
    feature_weight: float = 1.0
    epochs: int = 5
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    seed: int = 0

    def validate(self) -> None:
        check_range("temperature", self.temperature, 0.0, 1e6, lo_open=True)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_choice("feature_loss", self.feature_loss, ("mse", "cosine"))
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))
        check_range("feature_weight", self.feature_weight, 0.0, 1e6, lo_open=True)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.hints, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.hints.items()):
            raise ValueError(f"hints must map student layer names to teacher layer names, got {self.hints!r}")

    def __hash__(self) -> int:  # a dict field: hash what identifies the config
        return hash((self.temperature, self.alpha, tuple(sorted(self.hints.items())), self.epochs, self.lr))
