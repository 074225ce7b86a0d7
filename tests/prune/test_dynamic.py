"""Dynamic sparse training: SET and RigL (slimkit.prune.DynamicSparsity, sparse_train)."""

import copy
import math

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.prune import DynamicSparsity, sparse_train
from slimkit.prune.dynamic import erk_densities
from slimkit.train import fit


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))


def test_the_budget_holds_every_step_and_the_mask_moves_then_settles():
    model = _mlp()
    ds = DynamicSparsity(model, 0.8, method="rigl", update_every=5, budget="uniform", end=0.5)
    counts = []

    def after(step, total):
        ds(step, total)
        counts.append({n: int(ds.masks[n].sum()) for n in ds.layers})
        assert all(bool((m.weight[~ds.masks[n]] == 0).all()) for n, m in ds.layers.items())  # zeros held exactly

    fit(model, _data(), epochs=6, lr=0.1, weight_decay=1e-3, after_step=after)  # momentum and decay: zeros held
    assert all(c == counts[0] for c in counts)  # the budget: the same count of connections every step
    assert {n: round(s, 2) for n, s in ds.sparsity_per_layer().items()} == {"0": 0.8, "2": 0.8, "4": 0.8}
    assert ds.updates > 3 and sum(h["moved"] for h in ds.history) > 0
    fractions = [h["drop_fraction"] for h in ds.history]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] <= 0.3
    assert all(h["step"] < 0.5 * 72 for h in ds.history)  # no update after `end`: the final mask is stable
    assert ds.fraction(36, 72) == 0.0 and math.isclose(ds.fraction(0, 72), 0.3)


def test_rigl_drops_the_smallest_and_grows_where_the_gradient_is_largest():
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1.0, 17.0).reshape(4, 4))  # magnitudes 1..16
    ds = DynamicSparsity(nn.Sequential(lin), 0.5, method="rigl", update_every=10, drop_fraction=0.25,
                         schedule="constant", budget="uniform", init="magnitude")
    assert ds.masks["0"].flatten().tolist() == [False] * 8 + [True] * 8  # the 8 largest kept
    grad = torch.zeros(4, 4)
    grad.view(-1)[[0, 3]] = torch.tensor([5.0, 9.0])  # two inactive places with a large gradient
    lin.weight.grad = grad
    ds(10, 1000)  # an update step: 25% of 8 active = 2 dropped (values 9, 10), 2 grown (places 0 and 3)
    kept = ds.masks["0"].flatten().nonzero().flatten().tolist()
    assert kept == [0, 3, 10, 11, 12, 13, 14, 15]
    assert lin.weight.view(-1)[0] == 0 and lin.weight.view(-1)[3] == 0  # new connections start at zero


def test_set_grows_at_random_and_differs_from_rigl():
    moved = {}
    for method in ("set", "rigl"):
        model = _mlp()
        ds = DynamicSparsity(model, 0.9, method=method, update_every=3, budget="uniform", seed=1)
        fit(model, _data(), epochs=2, lr=0.1, after_step=ds)
        moved[method] = {n: m.clone() for n, m in ds.masks.items()}
        assert {n: round(s, 2) for n, s in ds.sparsity_per_layer().items()} == {"0": 0.9, "2": 0.9, "4": 0.9}
    assert any(not torch.equal(moved["set"][n], moved["rigl"][n]) for n in moved["set"])


def test_erk_keeps_small_layers_denser_and_the_total_on_budget():
    shapes = {"a": (256, 256), "b": (256, 8), "c": (3, 256)}
    d = erk_densities(shapes, 0.1)
    total = sum(math.prod(s) for s in shapes.values())
    assert math.isclose(sum(d[n] * math.prod(s) for n, s in shapes.items()) / total, 0.1, rel_tol=1e-9)
    assert d["a"] < d["b"] and d["a"] < d["c"] and max(d.values()) <= 1.0
    model = _mlp()
    ds = DynamicSparsity(model, 0.9, budget="erk")
    zeros = sum(int((m.weight == 0).sum()) for m in ds.layers.values())
    assert abs(zeros / sum(m.weight.numel() for m in ds.layers.values()) - 0.9) < 0.01


def test_dense_first_last_and_the_plan(tmp_path):
    model = _mlp()
    s = sparse_train(model, {"sparsity": 0.8, "method": "rigl", "update_every": 4, "epochs": 2, "lr": 0.1,
                             "dense_first_last": True, "init": "random"}, _data())
    plan = s.slimkit_plan
    assert set(plan.sparsity_) == {"2"} and set(plan.skipped) == {"0", "4"}
    assert (s[0].weight == 0).sum() == 0 and abs(float((s[2].weight == 0).float().mean()) - 0.8) < 0.01
    assert plan.coverage_["dynamic_sparsity"]["updates"] > 0
    assert (model[2].weight == 0).sum() == 0  # the caller's model is untouched
    sk.save(s, tmp_path / "s")
    loaded = sk.load(tmp_path / "s", _mlp())
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), s(x)) and loaded.slimkit_plan.sparsity_ == plan.sparsity_
    assert sk.export_onnx(s, tmp_path / "s.onnx", x).parity.ok
    w = s[2].weight
    w.sum().backward()  # the hooks are gone: the model's gradients are its own again
    assert bool((w.grad != 0).all())


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
    ({"sparsity": 0.5, "update_every": 0}, "update_every is a number of optimizer steps, at least 1"),
    ({"sparsity": 0.5, "drop_fraction": 1.0}, "would leave it empty"),
    ({"sparsity": 0.5, "method": "snip"}, "method must be one of 'rigl', 'set'"),
    ({"sparsity": 0.5, "budget": "random"}, "budget must be one of"),
    ({"sparsity": 0.999, "budget": "uniform"}, "leaves layer '0' .* empty"),
    ({"sparsity": 0.5, "init": "snip"}, "init must be one of 'random', 'magnitude', 'saliency'"),
    ({"sparsity": 0.5, "init": "saliency"}, "init='saliency' scores the weights on data"),
    ({"sparsity": 0.5, "data": [torch.randn(2, 4)]}, "data is only read by init='saliency'"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicSparsity(nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2)), **kwargs)


def test_a_model_without_prunable_layers_is_an_error():
    with pytest.raises(ValueError, match="has no Linear or Conv2d layer to train sparse"):
        DynamicSparsity(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="besides its first and last"):
        DynamicSparsity(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.5, dense_first_last=True)
    with pytest.raises(ValueError, match="sparsity must be in"):
        sparse_train(_mlp(), {"sparsity": 1.5}, _data())
    with pytest.raises(ValueError, match="train_data is empty"):
        sparse_train(_mlp(), "rigl-90", [])
    with pytest.raises(ValueError, match="unknown preset 'rigl-95' \\(did you mean 'rigl-90'\\?\\)"):
        sparse_train(_mlp(), "rigl-95", _data())


def test_a_recipe_stage_takes_it():
    from slimkit.recipe import RecipeError, load_recipe

    text = ("model: {factory: 'slimkit.zoo:digits_model', args: [mlp]}\ndata: slimkit.data:task\n"
            "evaluate: slimkit.data:digits_accuracy\nout: /tmp/unused\nstages:\n  - sparse_train: rigl-90\n"
            "  - quantize: int8\n")
    r = load_recipe(text=text)
    assert r.stages[0].kind == "sparse_train" and r.stages[0].config.sparsity == 0.9
    with pytest.raises(RecipeError, match=r":6: stages\[0\]\.sparse_train\.sparsity: sparsity must be in"):
        load_recipe(text=text.replace("sparse_train: rigl-90", "sparse_train: {sparsity: 2}"))


def test_a_random_mask_is_independent_of_the_weights_it_masks():
    torch.manual_seed(0)  # the weights come from the global seed-0 stream; the mask must not
    lin = nn.Linear(64, 64)
    ds = DynamicSparsity(nn.Sequential(lin), 0.5, budget="uniform", init="random", seed=0)
    kept = lin.weight[ds.masks["0"]]
    assert 0.4 < float((kept > 0).float().mean()) < 0.6  # about as many positive as negative weights kept


def test_a_saliency_mask_keeps_the_weights_snip_keeps():
    """init='saliency' starts from SNIP's |w x grad| on the data: the same weights unstructured pruning
    with taylor importance keeps (one global threshold), not the largest ones."""
    model, data = _mlp(), _data(4)
    with torch.no_grad():
        model[0].weight[:, :4] *= 10.0  # large weights on inputs that are then zeroed: no gradient, no saliency
    data = [(torch.cat([x[:, :4] * 0, x[:, 4:]], 1), y) for x, y in data]
    snip = sk.prune(model, {"method": "unstructured", "sparsity": 0.5, "importance": "taylor", "scope": "global"}, data=data)
    ds = DynamicSparsity(copy.deepcopy(model), 0.5, budget="global", init="saliency", data=data)
    for name in ("0", "2", "4"):
        assert torch.equal(ds.masks[name], snip.get_submodule(name).weight != 0), name
    assert not bool(ds.masks["0"][:, :4].any())  # the large weights nothing flows through go first
    magnitude = DynamicSparsity(copy.deepcopy(model), 0.5, budget="global", init="magnitude")
    assert float(magnitude.masks["0"][:, :4].float().mean()) > 0.9  # where the magnitude mask keeps nearly all
    trained = sparse_train(model, {"sparsity": 0.5, "init": "saliency", "budget": "global", "epochs": 1, "update_every": 4},
                           data)
    assert math.isclose(sum(float((m.weight == 0).sum()) for m in trained if isinstance(m, nn.Linear)) /
                        sum(m.weight.numel() for m in trained if isinstance(m, nn.Linear)), 0.5, abs_tol=0.01)
    assert not bool(trained[0].weight[:, :4].any())  # its first mask was the saliency one, and nothing grew there
