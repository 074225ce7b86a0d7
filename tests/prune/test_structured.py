"""Structured pruning: the dependency graph, exactness when the removed channels are dead, the
zoo nets shrinking and exporting, save/load, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.prune import PrunePlan, apply_plan, dependency_groups
from slimkit.train import accuracy, fit
from slimkit.zoo import digits_model, resnet18


class Branchy(nn.Module):
    """conv stem -> (residual add of two convs) -> concat with a depthwise branch -> 1x1 -> flatten -> linear"""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        s = F.relu(self.stem(x))
        r = F.relu(self.a(s)) + self.b(s)  # the add couples a's and b's outputs
        y = torch.cat([r, self.dw(s)], dim=1)  # r at offset 0, the depthwise output at 8
        y = F.relu(self.mix(F.relu(self.bn(y))))
        y = F.adaptive_avg_pool2d(y, 4)
        return self.fc(torch.flatten(y, 1))  # each of mix's channels is 16 features of fc


def _kill(model, name, channels):
    """Make output channels of ``name`` exactly zero after its ReLU (weights 0, bias negative)."""
    m = model.get_submodule(name)
    with torch.no_grad():
        m.weight[channels] = 0
        m.bias[channels] = -1.0


def test_groups_of_a_branchy_net():
    groups = dependency_groups(Branchy(), torch.randn(2, 3, 8, 8))
    by = {frozenset((m.module, m.role, m.offset, m.repeat) for m in g.members): g for g in groups}
    stem = next(g for k, g in by.items() if ("stem", "out", 0, 1) in k)
    assert {("dw", "dw", 0, 1), ("a", "in", 0, 1), ("b", "in", 0, 1), ("bn", "bn", 8, 1)} <= {
        (m.module, m.role, m.offset, m.repeat) for m in stem.members}
    add = next(g for k, g in by.items() if ("a", "out", 0, 1) in k)
    assert {("b", "out", 0, 1), ("bn", "bn", 0, 1), ("mix", "in", 0, 1)} <= {
        (m.module, m.role, m.offset, m.repeat) for m in add.members}
    mix = next(g for k, g in by.items() if ("mix", "out", 0, 1) in k)
    assert ("fc", "in", 0, 16) in {(m.module, m.role, m.offset, m.repeat) for m in mix.members}
    assert mix.frozen is None and stem.frozen is None
    fc = next(g for k, g in by.items() if ("fc", "out", 0, 1) in k)
    assert fc.frozen == "model output"


def test_pruning_dead_channels_is_exact():
    torch.manual_seed(0)
    net = Branchy().eval()
    with torch.no_grad():  # make the BatchNorm non-trivial
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    _kill(net, "mix", list(range(0, 12, 2)))  # half of mix's channels never reach fc
    x = torch.randn(4, 3, 8, 8)
    p = sk.prune(net, {"method": "structured", "sparsity": 0.5, "layers": ["mix"]}, example_inputs=x)
    assert p.mix.out_channels == 6 and p.fc.in_features == 6 * 16
    assert p.slimkit_plan.keep_["mix"]["out"] == list(range(1, 12, 2))  # the dead ones went
    with torch.no_grad():
        assert torch.allclose(p(x), net(x), atol=1e-5)
    assert net.mix.out_channels == 12  # the caller's model is untouched


def test_global_allocation_takes_the_dead_channels_wherever_they_are():
    """Two groups of 12 channels; half of mix's are dead, stem's all work. Removing a quarter of all
    channels globally takes exactly the dead ones (the output does not move); the uniform default
    takes a quarter of each, live stem channels too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(12 * 8 * 8, 4)).eval()
    _kill(net, "2", list(range(0, 12, 2)))
    x = torch.randn(4, 3, 8, 8)
    glob = sk.prune(net, {"method": "structured", "sparsity": 0.25, "scope": "global"}, example_inputs=x)
    assert (glob[0].out_channels, glob[2].out_channels) == (12, 6)
    with torch.no_grad():
        assert torch.allclose(glob(x), net(x), atol=1e-5)
    uniform = sk.prune(net, {"method": "structured", "sparsity": 0.25}, example_inputs=x)
    assert (uniform[0].out_channels, uniform[2].out_channels) == (9, 9)
    few = sk.prune(net, {"method": "structured", "sparsity": 0.9, "scope": "global", "round_to": 4}, example_inputs=x)
    assert min(few[0].out_channels, few[2].out_channels) >= 4  # never fewer than round_to (or one) channels


def test_global_allocation_on_a_trained_resnet_saves_and_reloads(trained_resnet, digits, tmp_path):
    x = digits.test_x[:2]
    p = sk.prune(trained_resnet, {"method": "structured", "sparsity": 0.5, "scope": "global"}, example_inputs=x)
    groups = [g for g in p.slimkit_plan.groups_ if "frozen" not in g]
    kept = [g["kept"] / g["channels"] for g in groups]
    removed = 1 - sum(g["kept"] for g in groups) / sum(g["channels"] for g in groups)
    # not uniform (uniform keeps every group at one ratio); the spread is 0.10-0.3 by the zoo checkpoint
    assert removed == pytest.approx(0.5, abs=0.02) and max(kept) - min(kept) > 0.05
    sk.save(p, tmp_path / "global")
    torch.testing.assert_close(sk.load(tmp_path / "global", trained_resnet)(x), p(x))
    with pytest.raises(ValueError, match="scope must be one of"):
        sk.PruneConfig(scope="everywhere")


def test_whole_branchy_net_shrinks_and_runs():
    net = Branchy().eval()
    x = torch.randn(2, 3, 8, 8)
    p = sk.prune(net, {"method": "structured", "sparsity": 0.5}, example_inputs=x)
    assert (p.stem.out_channels, p.a.out_channels, p.b.out_channels, p.dw.groups, p.bn.num_features) == (4, 4, 4, 4, 8)
    assert p.mix.in_channels == 8 and p.mix.out_channels == 6 and p.fc.in_features == 96 and p.fc.out_features == 5
    assert p(x).shape == (2, 5)


def test_round_to_and_never_zero_channels():
    net = nn.Sequential(nn.Conv2d(3, 20, 3), nn.ReLU(), nn.Conv2d(20, 3, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert sk.prune(net, {"sparsity": 0.5, "round_to": 8}, example_inputs=x)[0].out_channels == 16
    assert sk.prune(net, {"sparsity": 0.99}, example_inputs=x)[0].out_channels == 1


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_nets_shrink_and_export(name, digits, tmp_path):
    from slimkit.zoo import trained

    model = trained(name)
    p = sk.prune(model, {"method": "structured", "sparsity": 0.5, "round_to": 4}, example_inputs=digits.test_x[:2])
    n0 = sum(t.numel() for t in model.parameters())
    n1 = sum(t.numel() for t in p.parameters())
    assert n1 < 0.35 * n0, (n0, n1)
    report = sk.export_onnx(p, tmp_path / f"{name}.onnx", digits.test_x[:4])
    assert report.parity.rel_l2 < 1e-4
    sk.save(p, tmp_path / name)
    loaded = sk.load(tmp_path / name, digits_model(name))
    with torch.no_grad():
        assert torch.equal(loaded(digits.test_x[:8]), p(digits.test_x[:8]))


def test_resnet_recovers_with_fine_tuning(trained_resnet, digits):
    p = sk.prune(trained_resnet, {"method": "structured", "sparsity": 0.5}, example_inputs=digits.test_x[:2])
    fit(p, batches(digits.train_x, digits.train_y, 32), epochs=2, lr=0.02, teacher=trained_resnet)
    assert accuracy(p, digits.test_x, digits.test_y) > 95


def test_taylor_importance_prefers_channels_that_matter(digits):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(1024, 32), nn.ReLU(), nn.Linear(32, 10))
    fit(net, batches(digits.train_x, digits.train_y, 64), epochs=3, lr=0.05)
    with torch.no_grad():  # large but useless: big weights on 8 units whose outputs nothing reads
        net[1].weight[:8] *= 5
        net[3].weight[:, :8] = 0
    data = batches(digits.train_x[:256], digits.train_y[:256], 64)
    taylor = sk.prune(net, {"sparsity": 0.25, "importance": "taylor"}, example_inputs=digits.test_x[:2], data=data)
    l1 = sk.prune(net, {"sparsity": 0.25, "importance": "l1"}, example_inputs=digits.test_x[:2])
    # taylor removes only units that change nothing (the 8 made useless, or ReLU units dead on the
    # data): the pruned net computes the same function; l1 is fooled by the large useless weights
    assert taylor[1].out_features == 24
    seen = digits.train_x[:256]  # the data the scores came from
    with torch.no_grad():
        assert torch.allclose(taylor(seen), net(seen), atol=1e-5)
    assert set(range(8)) <= set(l1.slimkit_plan.keep_["1"]["out"])
    with torch.no_grad():
        assert not torch.allclose(l1(seen), net(seen), atol=1e-2)


def test_label_free_taylor_ranks_by_output_sensitivity(digits):
    """Inputs alone (no labels): |w x grad| of a random projection of the output. It sees through
    the large useless weights as the labelled score does, and ranks the live units as it does."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(1024, 32), nn.ReLU(), nn.Linear(32, 10))
    fit(net, batches(digits.train_x, digits.train_y, 64), epochs=3, lr=0.05)
    with torch.no_grad():
        net[1].weight[:8] *= 5
        net[3].weight[:, :8] = 0
    x = digits.train_x[:256]
    free = sk.prune(net, {"sparsity": 0.25, "importance": "taylor"}, example_inputs=x[:2], data=batches(x, None, 64))
    assert free[1].out_features == 24
    with torch.no_grad():  # only units that change nothing went: the useless 8, or ReLU units dead on the data
        assert torch.allclose(free(x), net(x), atol=1e-5)


class _MaskedTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.ffn = nn.Embedding(30, 8), nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.ffn(self.embed(input_ids)))  # padded positions get outputs too, as in BERT


def test_label_free_taylor_ignores_padding():
    """A tokenizer batch without labels: the outputs at padded positions add nothing to the scores,
    whatever token ids sit there."""
    from slimkit.prune.importance import taylor_importance

    torch.manual_seed(0)
    net = _MaskedTokens()
    ids = torch.randint(0, 30, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0
    other = ids.clone()
    other[:, 4:] = (other[:, 4:] + 7) % 30
    a = taylor_importance(net, [{"input_ids": ids, "attention_mask": mask}])
    b = taylor_importance(net, [{"input_ids": other, "attention_mask": mask}])
    assert a["ffn.weight"].sum() > 0 and torch.allclose(a["ffn.weight"], b["ffn.weight"])
    unmasked = taylor_importance(net, [{"input_ids": other, "attention_mask": torch.ones_like(mask)}])
    assert not torch.allclose(unmasked["ffn.weight"], b["ffn.weight"])


def test_plan_round_trip_and_mismatch(digits):
    net = digits_model("resnet18")
    p = sk.prune(net, {"sparsity": 0.5}, example_inputs=digits.test_x[:2])
    plan = PrunePlan.from_dict(p.slimkit_plan.to_dict())
    again = apply_plan(net, plan)
    with torch.no_grad():
        assert torch.equal(again.eval()(digits.test_x[:4]), p.eval()(digits.test_x[:4]))
    with pytest.raises(ValueError, match="the plan does not match this model: layer 'stem.0' has"):
        apply_plan(resnet18(width=8, in_channels=1, small_input=True), PrunePlan.from_dict({**plan.to_dict(), "keep": {"stem.0": plan.keep_["stem.0"]}}))
    with pytest.raises(ValueError, match="no layer named 'features.0.0'"):
        apply_plan(net, PrunePlan.from_dict({**plan.to_dict(), "keep": {"features.0.0": {"out": [0]}}, "sizes": {}}))


def test_structured_bad_input():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    for bad, match in [({"sparsity": 1.0}, r"sparsity must be in \[0.0, 1.0\)"), ({"sparsity": -0.1}, "sparsity"),
                       ({"round_to": 0}, "round_to"), ({"importance": "random"}, "importance"),
                       ({"sparsity": 0.5, "method": "nm", "n": 4, "m": 4}, "n < m"), ({"sparsiti": 0.5}, "did you mean")]:
        with pytest.raises(ValueError, match=match):
            sk.prune(net, bad, example_inputs=x)
    with pytest.raises(ValueError, match="needs example_inputs"):
        sk.prune(net, {"sparsity": 0.5})
    with pytest.raises(ValueError, match="taylor' needs data"):
        sk.prune(net, {"sparsity": 0.5, "importance": "taylor"}, example_inputs=x)
    with pytest.raises(ValueError, match="no module named 'fc'"):
        sk.prune(net, {"sparsity": 0.5, "exclude": ["fc"]}, example_inputs=x)
    with pytest.raises(ValueError, match="every channel group is kept whole"):
        sk.prune(net, {"sparsity": 0.5, "exclude": ["0"]}, example_inputs=x)  # 0's outputs feed 2: both kept
    bad_w = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        bad_w[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer '2' has NaN or infinite weights"):
        sk.prune(bad_w, {"sparsity": 0.5}, example_inputs=x)
    with pytest.raises(ValueError, match="batch 0"):
        sk.prune(net, {"sparsity": 0.5, "importance": "taylor"}, example_inputs=x,
                 data=[(torch.full((2, 4), float("nan")), torch.tensor([0, 1]))])


class Dynamic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.b(self.a(x))


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        h = torch.roll(h, 1, dims=1)  # an op the pruner does not know: a's channels are frozen
        return self.c(torch.relu(self.b(h)))


def test_untraceable_and_unknown_ops():
    # fx cannot trace it: the channel groups are found by probing the model instead
    x = torch.randn(2, 4)
    p = sk.prune(Dynamic(), {"sparsity": 0.5}, example_inputs=x)
    assert p.a.out_features == 4 and p.b.in_features == 4 and p(x).shape == (2, 2)
    assert [sorted(g["members"]) for g in p.slimkit_plan.groups_ if "frozen" not in g] == [["a", "b"]]
    p = sk.prune(Opaque(), {"sparsity": 0.5}, example_inputs=torch.randn(2, 4))
    assert p.a.out_features == 8 and p.b.out_features == 4
    frozen = [g for g in p.slimkit_plan.groups_ if "a" in g["members"] and g["channels"] == 8]
    assert frozen and "roll" in frozen[0]["frozen"]


def test_batchnorm_recalibration_rescues_accuracy_before_fine_tuning(trained_resnet, digits):
    cfg = {"method": "structured", "sparsity": 0.5}
    plain = sk.prune(trained_resnet, cfg, example_inputs=digits.test_x[:2])
    data = batches(digits.train_x[:512], digits.train_y[:512], 64)
    recal = sk.prune(trained_resnet, cfg, data=data)  # example inputs taken from the data
    assert recal.slimkit_plan.keep_ == plain.slimkit_plan.keep_  # same channels: only BN statistics differ
    a_plain, a_recal = (accuracy(m, digits.test_x, digits.test_y) for m in (plain, recal))
    assert a_plain < 30 and a_recal > 60, (a_plain, a_recal)  # measured: 10.6 -> 76.9
    off = sk.prune(trained_resnet, {**cfg, "recalibrate_bn": False}, data=data)
    assert accuracy(off, digits.test_x, digits.test_y) == a_plain
    assert not trained_resnet.training  # the caller's model and its flags are untouched


def test_sensitivity_scan_ranks_the_fragile_groups(digits):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    fit(net, batches(digits.train_x, digits.train_y, 64), epochs=3, lr=0.05)
    with torch.no_grad():  # make the second hidden layer mostly redundant: 48 of its units contribute nothing
        net[5].weight[:, 16:] = 0
    from slimkit.prune import sensitivity_scan

    net.train()
    scan = sensitivity_scan(net, digits.test_x[:2], batches(digits.train_x[:256], digits.train_y[:256], 128),
                            ratios=(0.25, 0.5, 0.75))
    assert net.training  # the caller's flags are untouched
    net.eval()
    assert set(scan) == {"1", "3"}
    assert all(len(c) == 3 and c[0][1] <= c[1][1] <= c[2][1] for c in scan.values())  # cost grows with the cut
    assert scan["3"][1][1] < scan["1"][1][1]  # the redundant layer is the cheap one to prune
    metric_scan = sensitivity_scan(net, digits.test_x[:2], [digits.test_x[:64]], ratios=(0.5,),
                                   metric=lambda m: accuracy(m, digits.test_x, digits.test_y))
    assert set(metric_scan) == {"1", "3"}
    with pytest.raises(ValueError, match="ratios must be fractions"):
        sensitivity_scan(net, digits.test_x[:2], [digits.test_x[:8]], ratios=(1.0,))
    with pytest.raises(ValueError, match="importance must be 'l1' or 'l2'"):
        sensitivity_scan(net, digits.test_x[:2], [digits.test_x[:8]], importance="taylor")


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent: fx cannot trace through this module
            return x * 2
        return x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b, self.c = nn.Linear(4, 8), Gate(), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.gate(self.a(x)))))


def test_untraceable_module_is_named_and_can_be_excluded(caplog):
    x = torch.randn(2, 4)
    with caplog.at_level("INFO", logger="slimkit.prune.plan"):
        probed = sk.prune(Gated(), {"sparsity": 0.5}, example_inputs=x)
    assert "could not trace Gated in module 'gate'" in caplog.text and "probing" in caplog.text
    # pushing a's channels flips the gate's branch (every channel doubles): a is kept whole, b is cut
    assert probed.a.out_features == 8 and probed.b.out_features == 4
    assert torch.allclose(probed(x), probed(x)) and probed(x).shape == (2, 2)
    p = sk.prune(Gated(), {"sparsity": 0.5, "exclude": ["gate"]}, example_inputs=x)
    assert p.a.out_features == 8  # feeds the opaque gate: kept whole
    assert p.b.out_features == 4 and p.c.in_features == 4
    assert p(x).shape == (2, 2)


def test_padding_modules_pass_channels_through():
    """TensorFlow-style SAME padding (EfficientNet-Lite) is an explicit ZeroPad2d before the conv."""
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.ZeroPad2d((0, 1, 0, 1)),
                      nn.Conv2d(16, 16, 3, stride=2, groups=16), nn.ReLU6(), nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    p = sk.prune(m, {"method": "structured", "sparsity": 0.5}, example_inputs=x)
    assert p[0].out_channels == 8 and p[3].groups == 8 and p[5].in_channels == 8
    assert p(x).shape == m(x).shape


def test_bad_example_inputs_are_named_before_probing():
    with pytest.raises(ValueError, match="example_inputs: batch 0 holds NaN"):
        sk.prune(Dynamic(), {"sparsity": 0.5}, example_inputs=torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match=r"example_inputs: .* failed in layer 'a' \(Linear, input shape \[2, 5\]\)"):
        sk.prune(Dynamic(), {"sparsity": 0.5}, example_inputs=torch.randn(2, 5))


class SqueezeExcite(nn.Module):
    """conv -> grouped conv (2 groups) -> squeeze-excite gate -> 1x1 -> pool -> linear"""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.squeeze = nn.Conv2d(8, 2, 1)
        self.excite = nn.Conv2d(2, 8, 1)
        self.last = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.grouped(F.relu(self.first(x))))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        return self.fc(self.last(y * gate).mean((2, 3)))


def test_grouped_convs_and_gating_are_followed():
    groups = dependency_groups(SqueezeExcite(), torch.randn(2, 3, 8, 8))
    roles = [({(m.module, m.role) for m in g.members}, g) for g in groups]
    first = next(g for k, g in roles if ("first", "out") in k)
    assert ("grouped", "in") in {(m.module, m.role) for m in first.members}
    assert first.frozen is None and first.chunks == 2  # each of the grouped conv's groups keeps as many
    gated = next(g for k, g in roles if ("grouped", "out") in k)  # y * gate couples grouped's and excite's outputs
    assert {("excite", "out"), ("squeeze", "in"), ("last", "in")} <= {(m.module, m.role) for m in gated.members}
    assert gated.frozen is None and gated.chunks == 2


def test_pruning_dead_channels_of_grouped_and_gated_layers_is_exact():
    torch.manual_seed(0)
    net = SqueezeExcite().eval()
    _kill(net, "first", [0, 3, 4, 7])  # two in each of the grouped conv's groups: 0-3 and 4-7
    _kill(net, "grouped", [1, 2, 5, 6])
    x = torch.randn(4, 3, 8, 8)
    p = sk.prune(net, {"method": "structured", "sparsity": 0.5, "layers": ["first", "grouped"]}, example_inputs=x)
    assert p.slimkit_plan.keep_["first"]["out"] == [1, 2, 5, 6]
    assert p.slimkit_plan.keep_["grouped"] == {"in": [1, 2, 5, 6], "out": [0, 3, 4, 7]}
    assert (p.grouped.groups, p.grouped.in_channels, p.grouped.out_channels) == (2, 4, 4)
    assert p.excite.out_channels == 4 and p.last.in_channels == 4 and p.squeeze.in_channels == 4
    with torch.no_grad():
        assert torch.allclose(p(x), net(x), atol=1e-5)
    assert net.grouped.in_channels == 8  # the caller's model is untouched


def test_grouped_conv_keeps_its_groups_even():
    """Sparsity 0.2 asks 7 of 8 channels (8 - floor(1.6)): the groups a 2-group conv reads and makes
    round up to 8, 'last' (not grouped) keeps 5 of 6; at 0.3 they keep 6, 3 in each group."""
    x = torch.randn(2, 3, 8, 8)
    p = sk.prune(SqueezeExcite(), {"method": "structured", "sparsity": 0.2}, example_inputs=x)
    assert (p.grouped.in_channels, p.grouped.out_channels, p.last.out_channels) == (8, 8, 5)
    p = sk.prune(SqueezeExcite(), {"method": "structured", "sparsity": 0.3}, example_inputs=x)
    assert (p.grouped.in_channels, p.grouped.out_channels, p.grouped.groups) == (6, 6, 2) and p(x).shape == (2, 3)
    assert [c // 4 for c in p.slimkit_plan.keep_["grouped"]["out"]] == [0, 0, 0, 1, 1, 1]


def test_the_mixed_cnn_is_pruned_as_deep_as_torch_pruning_prunes_it():
    """Every group of the zoo's mixed CNN is cut (the classifier aside): a quarter of the weights stay."""
    from slimkit.zoo import mixed_cnn

    net = mixed_cnn().eval()
    x = torch.randn(2, 1, 32, 32)
    p = sk.prune(net, {"method": "structured", "sparsity": 0.5}, example_inputs=x)
    frozen = {g["frozen"] for g in p.slimkit_plan.groups_ if "frozen" in g}
    assert frozen == {"model input", "model output"}
    kept = sum(q.numel() for q in p.parameters()) / sum(q.numel() for q in net.parameters())
    assert 0.24 < kept < 0.28 and p(x).shape == (2, 10)


def test_a_plan_that_leaves_a_grouped_conv_uneven_is_refused():
    x = torch.randn(2, 3, 8, 8)
    net = SqueezeExcite()
    plan = sk.prune(net, {"method": "structured", "sparsity": 0.5}, example_inputs=x).slimkit_plan.to_dict()
    plan["keep"]["grouped"]["out"] = [0, 1, 2, 4]  # three from the first group, one from the second
    with pytest.raises(ValueError, match="grouped conv 'grouped' .* same number"):
        apply_plan(net, PrunePlan.from_dict(plan))
    assert net.grouped.out_channels == 8
