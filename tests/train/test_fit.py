import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.train import fit


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, left, right):
        return self.a(left) + self.b(right)


def test_feature_distillation_with_a_custom_loss_on_dict_batches_and_adamw():
    torch.manual_seed(0)
    teacher, student = DictNet(), DictNet()
    data = [{"left": torch.randn(16, 6), "right": torch.randn(16, 6)} for _ in range(8)]

    def gap():
        with torch.no_grad():
            return sum(float(F.mse_loss(student(**b), teacher(**b))) for b in data)

    before = gap()
    fit(student, data, epochs=40, lr=0.05, optimizer="adamw", weight_decay=0.0, teacher=teacher,
        loss=lambda s, t: F.mse_loss(s, t))
    assert gap() < 0.01 * before
    assert not student.training


def test_fit_is_deterministic_under_a_seed():
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(4)]
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = nn.Linear(3, 2)
        fit(m, data, epochs=2, lr=0.1, seed=5)
        runs.append(m.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_fit_bad_input():
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="empty"):
        fit(m, [])
    with pytest.raises(ValueError, match="optimizer must be"):
        fit(m, [(torch.randn(2, 3), torch.tensor([0, 1]))], optimizer="lion")
    with pytest.raises(FloatingPointError, match="loss became nan in epoch 1"):
        fit(m, [(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))])
