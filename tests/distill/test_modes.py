import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.distill import KDLoss, MutualLoss, distill_online
from slimkit.prune import EarlyExit
from slimkit.train import accuracy
from slimkit.zoo import mlp


def test_mutual_loss_gives_each_student_its_own_gradient():
    z1, z2 = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    MutualLoss(3.0, 0.7)((z1, z2), y).backward()
    a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    KDLoss(3.0, 0.7)(a, z2.detach(), y).backward()
    KDLoss(3.0, 0.7)(b, z1.detach(), y).backward()
    assert torch.allclose(z1.grad, a.grad) and torch.allclose(z2.grad, b.grad)  # peers act as constants


def test_online_mutual_learning_trains_every_student_from_scratch(digits):
    data = batches(digits.train_x, digits.train_y, 64)
    a, b = mlp(hidden=(64,)), mlp(hidden=(32, 32))
    before = a[1].weight.detach().clone()
    out = distill_online([a, b], data, sk.DistillConfig(mode="online", epochs=4, lr=0.05))
    assert torch.equal(a[1].weight, before)  # copies trained; the callers' students are untouched
    accs = [accuracy(s, digits.test_x, digits.test_y) for s in out]
    assert min(accs) > 90, accs
    # the students learned from each other: they agree on held-out digits more than they err
    with torch.no_grad():
        agree = (out[0](digits.test_x).argmax(-1) == out[1](digits.test_x).argmax(-1)).float().mean()
    assert agree > 0.9
    s = sk.distill(mlp(hidden=(64,)), mlp(hidden=(32,)), data[:4], {"mode": "online", "epochs": 1})
    assert isinstance(s, nn.Sequential) and s[1].out_features == 64  # the student comes back, not a peer


def test_self_distilled_exits_answer_easy_inputs_early(trained_resnet, digits):
    data = batches(digits.train_x, digits.train_y, 64)
    net = sk.distill(trained_resnet, None, data, {"mode": "self", "exits": ["layers.2", "layers.1"], "epochs": 3,
                                                 "lr": 0.05, "exit_threshold": 0.95})
    assert isinstance(net, EarlyExit) and net.exits == ["layers.1", "layers.2"]  # ordered as the forward pass meets them
    assert not any(h for m in trained_resnet.modules() for h in m._forward_hooks.values())
    x, y = digits.test_x, digits.test_y
    full = accuracy(trained_resnet, x, y)
    with torch.no_grad():
        net.threshold = None
        *exits, last = net(x)
        assert torch.allclose(last, net.model(x), atol=1e-5)
        exit_accs = [100 * float((e.argmax(-1) == y).float().mean()) for e in exits]
        net.threshold = 0.95
        early = net(x)
    assert exit_accs[1] > 90, exit_accs  # the second exit alone is a usable classifier
    taken = torch.bincount(net.last_exit, minlength=3)
    assert taken[:2].sum() > 0.5 * len(x), taken  # most digits leave before the end
    assert 100 * float((early.argmax(-1) == y).float().mean()) > full - 2.0


def test_early_exit_stops_the_forward_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    ran = []
    net[4].register_forward_hook(lambda *a: ran.append(1))
    ee = EarlyExit(net, ["1"], example_inputs=torch.randn(2, 4)).eval()
    ran.clear()
    ee.threshold = 0.0
    ee(torch.randn(3, 4))
    assert not ran and ee.last_exit.tolist() == [0, 0, 0]
    with pytest.raises(RuntimeError, match="export_early_exit writes it as one ONNX file"):
        sk.export_onnx(ee, "ee.onnx", torch.randn(2, 4))
    ee.threshold = 1.0  # never sure: every input runs the whole network and gets its output
    x = torch.randn(3, 4)
    assert torch.equal(ee(x), net(x)) and ran and ee.last_exit.tolist() == [1, 1, 1]


def test_born_again_generations_start_afresh_and_learn_from_the_last(trained_mlp, digits):
    data = batches(digits.train_x, digits.train_y, 64)
    before = trained_mlp[1].weight.detach().clone()
    gen = sk.distill(trained_mlp, None, data, {"mode": "self", "generations": 2, "epochs": 3, "lr": 0.05})
    assert torch.equal(trained_mlp[1].weight, before)
    assert not torch.allclose(gen[1].weight, before, atol=1e-2)  # re-initialised, not fine-tuned
    # 3 epochs from scratch: 1 to 4.2 points under the teacher, depending on the checkpoint the zoo trained
    assert accuracy(gen, digits.test_x, digits.test_y) > accuracy(trained_mlp, digits.test_x, digits.test_y) - 6


def test_distill_modes_bad_input(trained_mlp, trained_resnet, digits):
    data = batches(digits.train_x[:64], digits.train_y[:64], 32)
    with pytest.raises(ValueError, match="pass teacher=None"):
        sk.distill(mlp(), trained_mlp, data, {"mode": "self"})
    with pytest.raises(ValueError, match="needs a teacher"):
        sk.distill(mlp(), None, data)
    with pytest.raises(ValueError, match="exits are for mode='self'"):
        sk.DistillConfig(exits=("1",))
    with pytest.raises(ValueError, match="mode"):
        sk.DistillConfig(mode="mutual")
    with pytest.raises(ValueError, match="generations"):
        sk.DistillConfig(mode="self", generations=0)
    with pytest.raises(ValueError, match="no layer named .layer9. .did you mean"):
        sk.distill(trained_resnet, None, data, {"mode": "self", "exits": ["layer9"]})
    with pytest.raises(ValueError, match="differ in shape"):
        sk.distill(mlp(), mlp(num_classes=5), data, {"mode": "online"})
    with pytest.raises(ValueError, match="at least two"):
        distill_online([mlp()], data, sk.DistillConfig(mode="online"))
    with pytest.raises(ValueError, match="distinct"):
        m = mlp()
        distill_online([m, m], data, sk.DistillConfig(mode="online"), inplace=True)
    with pytest.raises(ValueError, match="threshold"):
        EarlyExit(mlp(), ["1"], example_inputs=digits.train_x[:2], threshold=1.5)
    with pytest.raises(ValueError, match="exit layer '0' outputs shape"):
        EarlyExit(nn.Sequential(nn.Unflatten(1, (1, 1)), nn.Flatten(1), nn.Linear(1024, 3)), ["0"],
                  example_inputs=digits.train_x[:2])
    with pytest.raises(ValueError, match=r"needs a classifier.*got \(3,\)"):
        EarlyExit(nn.Sequential(nn.Flatten(0), nn.Linear(2048, 3)), ["1"], example_inputs=digits.train_x[:2])
    with pytest.raises(ValueError, match=r"needs \(inputs, labels\)"):
        sk.distill(mlp(), None, [digits.train_x[:8]], {"mode": "self", "exits": ["1"]})
