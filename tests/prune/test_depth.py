"""Depth pruning: which blocks can go, scoring by output change, save/load, export, bad input."""

import pytest
import torch

import slimkit as sk
from slimkit.data import batches
from slimkit.prune.depth import candidates
from slimkit.zoo import digits_model


def test_resnet_identity_blocks_are_the_candidates_and_removal_follows_the_scores(trained_resnet, digits, tmp_path):
    x = digits.test_x[:8]
    names = [n for n, _ in candidates(trained_resnet, x)]
    assert names == ["layers.0", "layers.1", "layers.3", "layers.5", "layers.7"]  # stride-1, same width
    data = batches(digits.train_x[:64], digits.train_y[:64], 32)
    d = sk.prune(trained_resnet, {"method": "depth", "sparsity": 0.4}, example_inputs=x, data=data)
    plan = d.slimkit_plan
    assert len(plan.dropped_) == 2
    # the two removed are the two whose absence changes the outputs least
    assert sorted(plan.scores_, key=plan.scores_.get)[:2] == sorted(plan.dropped_, key=plan.scores_.get)
    assert all(isinstance(d.get_submodule(n), torch.nn.Identity) for n in plan.dropped_)
    assert sum(p.numel() for p in d.parameters()) < sum(p.numel() for p in trained_resnet.parameters())
    assert not isinstance(trained_resnet.get_submodule(plan.dropped_[0]), torch.nn.Identity)  # caller's model kept
    assert "| yes |" in plan.summary()
    # save / load replays it on a fresh base, and it exports as a smaller graph
    sk.save(d, tmp_path / "d")
    back = sk.load(tmp_path / "d", digits_model("resnet18"))
    assert torch.equal(back(x), d.eval()(x))
    full = sk.export_onnx(trained_resnet, tmp_path / "full.onnx", x)
    cut = sk.export_onnx(d, tmp_path / "cut.onnx", x)
    assert cut.size_bytes < full.size_bytes


def test_depth_on_top_of_channel_pruning_chains_plans(trained_resnet, digits, tmp_path):
    x = digits.test_x[:4]
    p = sk.prune(trained_resnet, {"method": "structured", "sparsity": 0.5, "round_to": 8}, example_inputs=x)
    d = sk.prune(p, {"method": "depth", "sparsity": 1.0}, example_inputs=x)
    assert [pl.config.method for pl in d.slimkit_plans] == ["structured", "depth"]
    assert len(d.slimkit_plan.dropped_) == 5
    sk.save(d, tmp_path / "d")
    assert torch.equal(sk.load(tmp_path / "d", digits_model("resnet18"))(x), d.eval()(x))


def test_mobilenet_residual_blocks_only(digits):
    m = digits_model("mobilenet_v2").eval()
    found = candidates(m, digits.test_x[:2])
    assert found and all(getattr(b, "residual", False) for _, b in found), [n for n, _ in found]
    for name, block in found:  # removing one keeps the shapes: the model still runs
        assert block is m.get_submodule(name)


def test_exclude_and_bad_input(trained_resnet, trained_mlp, digits):
    x = digits.test_x[:2]
    d = sk.prune(trained_resnet, {"method": "depth", "sparsity": 1.0, "exclude": ["layers.7"]}, example_inputs=x)
    assert "layers.7" not in d.slimkit_plan.dropped_ and len(d.slimkit_plan.dropped_) == 4
    with pytest.raises(ValueError, match="no block that depth pruning can remove"):
        sk.prune(trained_mlp, {"method": "depth", "sparsity": 0.5}, example_inputs=x)
    with pytest.raises(ValueError, match="needs example_inputs"):
        sk.prune(trained_resnet, {"method": "depth", "sparsity": 0.5})
    with pytest.raises(ValueError, match="no module named 'layers.9'"):
        sk.prune(trained_resnet, {"method": "depth", "exclude": ["layers.9"]}, example_inputs=x)
    with pytest.raises(ValueError, match="sparsity"):  # 1.0 means every removable block for depth only
        sk.PruneConfig(method="structured", sparsity=1.0)
    assert sk.PruneConfig(method="depth", sparsity=1.0).sparsity == 1.0
    with pytest.raises(ValueError, match="NaN or infinite outputs"):
        sk.prune(trained_resnet, {"method": "depth"}, example_inputs=torch.full_like(x, float("nan")))
