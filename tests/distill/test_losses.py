import pytest
import torch
import torch.nn.functional as F

import slimkit as sk


def test_kd_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    T, a = 3.0, 0.7
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    want = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    assert float(sk.KDLoss(T, a)(s, t, y)) == pytest.approx(float(want), rel=1e-5)
    assert float(sk.KDLoss(T, a)(s, t)) == pytest.approx(float(T * T * kl), rel=1e-5)


def test_kd_loss_gradient_reaches_the_student_only():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    sk.KDLoss()(s, t, torch.tensor([0, 1, 2, 0])).backward()
    assert s.grad is not None and t.grad is None


def test_bad_kd_input():
    with pytest.raises(ValueError, match="temperature must be above 0"):
        sk.KDLoss(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        sk.KDLoss(alpha=1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        sk.KDLoss()(torch.randn(2, 3), torch.randn(2, 4))
