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


class Crash(Exception):
    pass


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def test_an_interrupted_run_resumes_to_exactly_the_same_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
    straight = fit(_net(), data, epochs=3, lr=0.05, checkpoint=tmp_path / "a.pt")

    def crash_in_epoch_2(step, total):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        fit(_net(), data, epochs=3, lr=0.05, checkpoint=tmp_path / "b.pt", after_step=crash_in_epoch_2)
    torch.manual_seed(99)  # a fresh process: other weights, other random state
    resumed = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    fit(resumed, data, epochs=3, lr=0.05, checkpoint=tmp_path / "b.pt")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    again = fit(_net(), data, epochs=3, lr=0.05, checkpoint=tmp_path / "a.pt")  # finished: nothing left to do
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), again.parameters(), strict=True))
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_mismatch_and_corruption(tmp_path):
    data = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))]
    fit(_net(), data, epochs=1, lr=0.05, checkpoint=tmp_path / "c.pt")
    with pytest.raises(ValueError, match="made with lr=0.05, this run has lr=0.1"):
        fit(_net(), data, epochs=1, lr=0.1, checkpoint=tmp_path / "c.pt")
    with pytest.raises(ValueError, match="does not match this model"):
        fit(nn.Linear(6, 3), data, epochs=1, lr=0.05, checkpoint=tmp_path / "c.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt is unreadable"):
        fit(_net(), data, epochs=1, checkpoint=tmp_path / "bad.pt")


def test_criterion_replaces_cross_entropy_and_evaluate_runs_every_epoch():
    data = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(4)]
    m = nn.Linear(3, 2)
    seen = []

    def evaluate(model):
        seen.append(model.training)
        with torch.no_grad():
            return float(sum(F.mse_loss(model(x), y) for x, y in data))

    before = evaluate(m)
    seen.clear()
    fit(m, data, epochs=3, lr=0.05, criterion=F.mse_loss, evaluate=evaluate)  # regression: labels are floats
    assert seen == [False] * 3 and evaluate(m) < before
    with pytest.raises(ValueError, match="criterion"):
        fit(m, data, criterion=F.mse_loss, teacher=nn.Linear(3, 2))
