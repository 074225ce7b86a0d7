"""Unstructured and N:M pruning: the masks, the zeros baked into the weights, save/load, bad input."""

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.prune import PrunePlan, apply_plan
from slimkit.prune.masks import fraction_mask, global_masks, nm_mask
from slimkit.train import accuracy, fit
from slimkit.zoo import digits_model


def _zeros(model):
    return {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_masks_keep_the_largest():
    s = torch.rand(50, 40)
    m = fraction_mask(s, 0.8)
    assert int(m.sum()) == 400 and float(s[m].min()) >= float(s[~m].max())
    a, b = torch.rand(100) * 10, torch.rand(300)
    ma, mb = global_masks([a, b], 0.5)
    assert int(ma.sum() + mb.sum()) == 200 and ma.float().mean() > mb.float().mean()
    nm = nm_mask(torch.randn(6, 16), 2, 4)
    assert (nm.reshape(-1, 4).sum(1) == 2).all()
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        nm_mask(torch.randn(3, 6), 2, 4)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_mlp_at_80_percent_recovers(trained_mlp, digits, scope):
    p = sk.prune(trained_mlp, {"method": "unstructured", "sparsity": 0.8, "scope": scope})
    zeros = _zeros(p)
    total = sum(m.weight.numel() for m in p.modules() if isinstance(m, nn.Linear))
    removed = sum(m.weight.numel() * zeros[n] for n, m in p.named_modules() if isinstance(m, nn.Linear))
    assert removed / total == pytest.approx(0.8, abs=0.01)
    if scope == "layer":
        assert all(z == pytest.approx(0.8, abs=0.01) for z in zeros.values())
    assert _zeros(trained_mlp)["1"] < 0.01  # the caller's model is untouched
    assert p.slimkit_plan.sparsity_ == pytest.approx(zeros)


def test_nm_is_two_of_four_along_input_channels(trained_resnet, digits):
    p = sk.prune(trained_resnet, {"method": "nm", "n": 2, "m": 4})
    w = p.layers[0].conv1.weight.permute(0, 2, 3, 1).reshape(-1, 4)
    assert ((w != 0).sum(1) <= 2).all()
    assert "stem.0" not in p.slimkit_plan.sparsity_  # 1 input channel: not a multiple of 4, skipped
    with pytest.raises(ValueError, match="layer 'stem.0': 1 input channels are not a multiple of m=4"):
        sk.prune(trained_resnet, {"method": "nm", "layers": ["stem.0"]})


def test_save_load_and_replay(trained_mlp, digits, tmp_path):
    p = sk.prune(trained_mlp, {"method": "unstructured", "sparsity": 0.7})
    sk.save(p, tmp_path / "u")
    loaded = sk.load(tmp_path / "u", digits_model("mlp"))
    with torch.no_grad():
        assert torch.equal(loaded(digits.test_x[:8]), p(digits.test_x[:8]))
    again = apply_plan(trained_mlp, PrunePlan.from_dict(p.slimkit_plan.to_dict()))  # magnitude: recomputed exactly
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), p.parameters(), strict=True))
    data = batches(digits.train_x[:128], digits.train_y[:128], 64)
    t = sk.prune(trained_mlp, {"method": "unstructured", "sparsity": 0.7, "importance": "taylor"}, data=data)
    with pytest.raises(ValueError, match="taylor plan's masks come from data"):
        apply_plan(trained_mlp, PrunePlan.from_dict(t.slimkit_plan.to_dict()))


def test_unstructured_then_quantize_chain(trained_mlp, digits, tmp_path):
    p = sk.prune(trained_mlp, {"method": "unstructured", "sparsity": 0.5})
    fit(p, batches(digits.train_x, digits.train_y, 64), epochs=1, lr=0.01, teacher=trained_mlp)
    q = sk.quantize(p, "int8", calib_data=batches(digits.train_x[:256], None, 64))
    assert accuracy(q, digits.test_x, digits.test_y) > 90
    sk.save(q, tmp_path / "pq")
    back = sk.load(tmp_path / "pq", digits_model("mlp"))
    assert [pl.kind for pl in back.slimkit_plans] == ["prune", "quant"]


def test_sparse_bad_input(trained_mlp):
    with pytest.raises(ValueError, match=r"data batch 0: taylor importance with labels needs \[N, classes\] logits and N "
                                         r"labels; the model returned shape \(2, 10\) for \(3,\) labels"):
        sk.prune(trained_mlp, {"method": "unstructured", "importance": "taylor"},
                 data=[(torch.randn(2, 1, 32, 32), torch.tensor([1, 2, 3]))])
    with pytest.raises(ValueError, match="is a Flatten; pruning takes Linear and Conv2d"):
        sk.prune(trained_mlp, {"method": "unstructured", "layers": ["0"]})
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        sk.prune(nn.Sequential(nn.ReLU()), {"method": "unstructured"})


def test_hold_zeros_keeps_the_pattern_through_fine_tuning(trained_mlp, digits):
    from slimkit.prune.masks import hold_zeros

    p = sk.prune(trained_mlp, {"method": "unstructured", "sparsity": 0.9})
    before = accuracy(p, digits.test_x, digits.test_y)
    zero = {n: m.weight == 0 for n, m in p.named_modules() if isinstance(m, nn.Linear)}
    with hold_zeros(p):
        fit(p, batches(digits.train_x, digits.train_y, 64), epochs=2, lr=0.01, teacher=trained_mlp)
    assert all(bool((m.weight[zero[n]] == 0).all()) for n, m in p.named_modules() if isinstance(m, nn.Linear))
    after = accuracy(p, digits.test_x, digits.test_y)
    assert after > before and after > accuracy(trained_mlp, digits.test_x, digits.test_y) - 2
    # without the hook, the same fine-tuning regrows the pruned weights
    q = sk.prune(trained_mlp, {"method": "unstructured", "sparsity": 0.9})
    fit(q, batches(digits.train_x, digits.train_y, 64), epochs=1, lr=0.01)
    assert float((q[1].weight == 0).float().mean()) < 0.5


def test_gradual_pruning_during_training(digits):
    from slimkit.prune.gradual import GradualPruning, polynomial_sparsity

    s = [polynomial_sparsity(t, 1000, 0.9, begin=0.1, end=0.6) for t in range(1000)]
    assert s[0] == 0.0 and s[100] == 0.0 and s[600] == pytest.approx(0.9) and all(a <= b for a, b in zip(s, s[1:], strict=False))
    torch.manual_seed(0)
    model = digits_model("mlp")
    sched = GradualPruning(model, 0.9, end=0.6, every=5)
    fit(model, batches(digits.train_x, digits.train_y, 64), epochs=6, lr=0.05, after_step=sched)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert zeros / total == pytest.approx(0.9, abs=0.005)
    assert accuracy(model, digits.test_x, digits.test_y) > 93  # trained sparse from scratch
    for bad, match in [(dict(final=1.0), "final < 1"), (dict(final=0.5, begin=0.6, end=0.5), "begin < end"),
                       (dict(final=0.5, every=0), "every"), (dict(final=0.5, layers=("0",)), "not a Linear")]:
        with pytest.raises(ValueError, match=match):
            GradualPruning(model, **bad)


def test_prune_at_initialization_then_train_sparse(digits):
    """Before training: connection sensitivity |w * dL/dw| of an untrained net on one batch (SNIP,
    Lee et al. 2019) picks the 90% to remove; the sparse net then trains with its zeros held."""
    from slimkit.prune.masks import hold_zeros

    torch.manual_seed(0)
    untrained = digits_model("mlp")
    one = batches(digits.train_x[:128], digits.train_y[:128], 128)
    sparse = sk.prune(untrained, {"method": "unstructured", "sparsity": 0.9, "importance": "taylor"}, data=one)
    zero = {n: m.weight == 0 for n, m in sparse.named_modules() if isinstance(m, nn.Linear)}
    with hold_zeros(sparse):
        fit(sparse, batches(digits.train_x, digits.train_y, 64), epochs=6, lr=0.05)
    assert all(bool((m.weight[zero[n]] == 0).all()) for n, m in sparse.named_modules() if isinstance(m, nn.Linear))
    assert accuracy(sparse, digits.test_x, digits.test_y) > 93
