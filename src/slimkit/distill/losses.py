"""Response-based distillation loss (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a
Neural Network"): the student matches the teacher's temperature-softened class distribution.

``loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)``, averaged
over the batch. The ``T^2`` keeps the soft term's gradients on the scale of the hard term's
(sec. 2 of the paper). With ``labels=None`` only the distillation term is returned (unscaled by alpha).

>>> import torch
>>> kd = KDLoss(temperature=4.0, alpha=0.5)
>>> s = torch.tensor([[2.0, 0.0, -1.0]])
>>> float(kd(s, s.clone(), None))  # a student equal to its teacher has nothing to learn
0.0
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    def __init__(self, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be above 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ in shape")
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits.detach() / t, dim=-1),
                        reduction="batchmean", log_target=True) * t * t
        if labels is None:
            return soft
        return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(student_logits, labels)
