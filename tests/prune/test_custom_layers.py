"""Teaching structured pruning a layer type of one's own: register_prunable."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit as sk
from slimkit.prune import PrunableLayer, register_prunable, unregister_prunable


class Scaled(nn.Module):
    """A Linear with a learned scale per output channel, computed in its own forward."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.scale = nn.Parameter(torch.rand(n_out) + 0.5)
        self.n_out = n_out

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


class ChannelGain(nn.Module):
    """A per-channel gain on [N, C, H, W] maps: output channel c from input channel c."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1, 1)


def _cut_scaled(m, out, inn):
    if out is not None:
        m.weight, m.scale, m.n_out = nn.Parameter(m.weight[out]), nn.Parameter(m.scale[out]), len(out)
    if inn is not None:
        m.weight = nn.Parameter(m.weight[:, inn])


def _cut_gain(m, out, inn):
    if out is not None:
        m.gain = nn.Parameter(m.gain[out])


@pytest.fixture
def registered():
    register_prunable(Scaled, PrunableLayer(out_channels=lambda m: m.weight.shape[0],
                                            in_channels=lambda m: m.weight.shape[1], cut=_cut_scaled))
    register_prunable(ChannelGain, PrunableLayer(out_channels=lambda m: m.gain.numel(),
                                                 in_channels=lambda m: m.gain.numel(), cut=_cut_gain,
                                                 weight=lambda m: m.gain, per_channel=True))
    yield
    unregister_prunable(Scaled)
    unregister_prunable(ChannelGain)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(Scaled(16, 32), nn.ReLU(), Scaled(32, 24), nn.ReLU(), nn.Linear(24, 4)).eval()


def test_an_unknown_layer_type_is_left_whole_with_the_reason():
    with pytest.raises(ValueError, match=r"made by linear \(node 'linear'\).*slimkit.prune.register_prunable"):
        sk.prune(_mlp(), {"method": "structured", "sparsity": 0.5}, example_inputs=torch.randn(2, 16))


def test_a_registered_layer_is_cut_exactly_and_replayed_by_load(registered, tmp_path):
    model = _mlp()
    x = torch.randn(64, 16)
    p = sk.prune(model, {"method": "structured", "sparsity": 0.5}, example_inputs=x[:2])
    assert p[0].weight.shape == (16, 16) and p[0].scale.shape == (16,) and p[0].n_out == 16
    assert p[2].weight.shape == (12, 16) and p[4].weight.shape == (4, 12)
    # exactly the original with the removed channels' outputs zeroed
    keep0, keep2 = p.slimkit_plan.keep_["0"]["out"], p.slimkit_plan.keep_["2"]["out"]
    ref = _mlp()
    with torch.no_grad():
        for layer, keep in ((ref[0], keep0), (ref[2], keep2)):
            drop = [i for i in range(layer.weight.shape[0]) if i not in keep]
            layer.scale[drop] = 0
        assert torch.allclose(p(x), ref(x), atol=1e-5)
    sk.save(p, tmp_path / "p")
    loaded = sk.load(tmp_path / "p", _mlp())
    assert torch.equal(loaded(x), p(x))
    assert sk.export_onnx(p, tmp_path / "p.onnx", x[:8]).parity.ok
    assert model[0].weight.shape == (32, 16)  # the caller's model is untouched


def test_a_registered_per_channel_layer_joins_its_inputs_group(registered):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ChannelGain(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    p = sk.prune(model, {"method": "structured", "sparsity": 0.5}, example_inputs=x)
    assert p[0].out_channels == 8 and p[1].gain.shape == (8,) and p[3].in_channels == 8
    keep = p.slimkit_plan.keep_["0"]["out"]
    assert p.slimkit_plan.keep_["1"]["out"] == keep
    with torch.no_grad():
        ref_out = model[3](F.relu(model[1](model[0](x)) * _mask(16, keep)))
    assert torch.allclose(p(x), ref_out, atol=1e-5)


def _mask(c, keep):
    m = torch.zeros(1, c, 1, 1)
    m[0, keep] = 1
    return m


def test_register_prunable_refuses_what_is_not_a_rule():
    with pytest.raises(TypeError, match="PrunableLayer"):
        register_prunable(Scaled, {"cut": _cut_scaled})
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_prunable(int, PrunableLayer(out_channels=len, in_channels=len, cut=_cut_scaled))
