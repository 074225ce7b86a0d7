import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.train import accuracy, fit
from slimkit.zoo import resnet18


def test_hints_pull_a_small_student_towards_the_teacher(trained_resnet, digits):
    torch.manual_seed(0)
    student = resnet18(width=8, in_channels=1, small_input=True)  # 1/4 the width, ~1/16 the weights
    kd = sk.FeatureKD(student, trained_resnet, {"layers.5": "layers.5", "layers.7": "layers.7"},
                      example_inputs=digits.test_x[:2])
    try:
        _train_with_hints(kd, student, trained_resnet, digits)
    finally:
        kd.close()
    x = digits.train_x[:64]
    with torch.no_grad():
        student(x)
    assert not kd._s  # hooks removed: nothing captured any more


def _train_with_hints(kd, student, trained_resnet, digits):
    assert isinstance(kd.adapters["layers_5"], nn.Conv2d) and kd.adapters["layers_5"].in_channels == 32
    x = digits.train_x[:64]

    def gap():
        with torch.no_grad():
            student.eval()(x)
            trained_resnet(x)
            return float(kd())

    before = gap()
    adapter = kd.adapters["layers_7"].weight.detach().clone()
    teacher_w = trained_resnet.fc.weight.detach().clone()
    fit(student, batches(digits.train_x, digits.train_y, 32), epochs=2, lr=0.05, teacher=trained_resnet, extra_loss=kd)
    assert gap() < 0.7 * before
    assert not torch.equal(adapter, kd.adapters["layers_7"].weight)  # the adapters learn too
    assert torch.equal(teacher_w, trained_resnet.fc.weight)  # the teacher does not
    assert accuracy(student, digits.test_x, digits.test_y) > 90


def test_cosine_and_identity_adapters():
    t = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    s = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with sk.FeatureKD(s, t, {"0": "0"}, example_inputs=torch.randn(2, 4), loss="cosine") as kd:
        assert isinstance(kd.adapters["0"], nn.Identity)
        s.load_state_dict(t.state_dict())
        x = torch.randn(8, 4)
        s(x)
        t(x)
        assert kd().item() == pytest.approx(0.0, abs=1e-6)  # identical features: nothing to learn


def test_feature_kd_bad_input(trained_resnet, digits):
    student = resnet18(width=8, in_channels=1, small_input=True)
    ex = digits.test_x[:2]
    hooks = sum(len(m._forward_hooks) for m in trained_resnet.modules())
    with pytest.raises(ValueError, match="the teacher has no layer named 'layers.77' \\(did you mean 'layers.7'\\?\\)"):
        sk.FeatureKD(student, trained_resnet, {"layers.5": "layers.5", "layers.7": "layers.77"}, example_inputs=ex)
    assert sum(len(m._forward_hooks) for m in trained_resnet.modules()) == hooks  # the failed set-up left none
    with pytest.raises(ValueError, match="differ in more than their width"):
        sk.FeatureKD(student, trained_resnet, {"layers.1": "layers.7"}, example_inputs=ex)  # 32x32 vs 4x4
    with pytest.raises(ValueError, match="loss must be"):
        sk.FeatureKD(student, trained_resnet, {"layers.7": "layers.7"}, example_inputs=ex, loss="l1")
    with pytest.raises(ValueError, match="pairs is empty"):
        sk.FeatureKD(student, trained_resnet, {}, example_inputs=ex)
    with sk.FeatureKD(student, trained_resnet, {"layers.7": "layers.7"}, example_inputs=ex) as kd:
        with pytest.raises(RuntimeError, match="run the student and the teacher"):
            kd()
    assert sum(len(m._forward_hooks) for m in trained_resnet.modules()) == hooks
