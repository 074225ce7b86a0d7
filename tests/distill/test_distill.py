import pytest
import torch

import slimkit as sk
from slimkit.data import batches
from slimkit.train import accuracy
from slimkit.zoo import mlp


def test_distill_a_small_mlp_from_the_trained_one_with_a_hint(trained_mlp, digits):
    torch.manual_seed(0)
    student = mlp(hidden=(64, 32))  # about 4x fewer weights than the teacher's (256, 128)
    before = [p.detach().clone() for p in student.parameters()]
    hooks = sum(len(m._forward_hooks) for m in trained_mlp.modules())
    out = sk.distill(student, trained_mlp, batches(digits.train_x, digits.train_y, 64),
                     {"epochs": 6, "lr": 0.05, "hints": {"3": "3"}, "feature_weight": 0.1})
    assert out is not student and all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert accuracy(out, digits.test_x, digits.test_y) > 94
    assert sum(len(m._forward_hooks) for m in trained_mlp.modules()) == hooks  # the hint hooks are gone


def test_distill_bad_input(trained_mlp, digits):
    data = batches(digits.train_x[:64], digits.train_y[:64], 32)
    with pytest.raises(ValueError, match="differ in shape"):
        sk.distill(mlp(num_classes=5), trained_mlp, data)
    with pytest.raises(ValueError, match=r"needs \(inputs, labels\) batches"):
        sk.distill(mlp(), trained_mlp, [digits.train_x[:8]])
    with pytest.raises(ValueError, match="the teacher has no layer named '33'"):
        sk.distill(mlp(), trained_mlp, data, {"hints": {"3": "33"}})
    for bad, match in [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"), ({"epochs": 0}, "epochs"),
                       ({"optimizer": "lion"}, "optimizer"), ({"hints": ["3"]}, "hints"), ({"temprature": 2}, "did you mean")]:
        with pytest.raises(ValueError, match=match):
            sk.distill(mlp(), trained_mlp, data, bad)
    with pytest.raises(ValueError, match="empty"):
        sk.distill(mlp(), trained_mlp, [])
    assert isinstance(sk.DistillConfig(hints={"a": "b"}).to_dict()["hints"], dict) and hash(sk.DistillConfig()) is not None
    with pytest.raises(ValueError, match="batch 0"):
        sk.distill(mlp(), trained_mlp, [(torch.full((2, 1, 32, 32), float("nan")), torch.tensor([0, 1]))])
