import pytest

import slimkit as sk
from slimkit.quant import QuantConfig


def test_round_trip_and_frozen():
    cfg = QuantConfig(calibrator="entropy", exclude=("fc",))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(AttributeError):
        cfg.calibrator = "mse"  # type: ignore[misc]


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ValueError, match=r"'calibrater' \(did you mean 'calibrator'\?\)"):
        QuantConfig.from_dict({"calibrater": "mse"})


@pytest.mark.parametrize("bad,match", [({"weight_bits": 1}, "weight_bits"), ({"calibrator": "kl"}, "calibrator"),
                                       ({"percentile": 40.0}, "percentile"), ({"activations": "int8"}, "activations")])
def test_out_of_range_values(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict(bad)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'int8'"):
        sk.quantize(__import__("torch").nn.Linear(2, 2), "int9")


def test_presets_are_listed():
    p = sk.presets()
    assert {"int8", "int8-dynamic"} <= set(p)
    assert p["int8"]["passes"][1]["activations"]["mode"] == "static"


def test_every_verb_has_named_configs_that_work_by_name():
    import torch

    from slimkit.data import batches, load_digits32

    assert set(sk.presets("qat")) == set(sk.qat_presets())
    for verb in ("prune", "factorize", "distill"):
        assert sk.presets(verb)
    with pytest.raises(ValueError, match="one of quantize, qat, prune, factorize, distill, sparse_train; got 'pruning'"):
        sk.presets("pruning")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    x = torch.randn(8, 64)
    p = sk.prune(m, "channels-50", example_inputs=x)
    assert p[0].weight.shape == (32, 64) and p[2].weight.shape == (10, 32)
    nm = sk.prune(m, "2:4", example_inputs=x)
    assert int((nm[0].weight.reshape(64, 16, 4) != 0).sum(-1).max()) == 2
    un = sk.prune(m, "unstructured-80", example_inputs=x)
    zeros = sum(int((un[i].weight == 0).sum()) for i in (0, 2)) / (64 * 64 + 10 * 64)
    assert abs(zeros - 0.8) < 0.01
    f = sk.factorize(m, "svd-50")
    assert f.slimkit_plan.ranks_ == {"0": [16], "2": [4]}
    d = load_digits32()
    data = batches(d.train_x[:64].flatten(1)[:, :64], d.train_y[:64], 32)
    s = sk.distill(torch.nn.Sequential(torch.nn.Linear(64, 10)), m, data, "kd")
    assert s[0].weight.shape == (10, 64)
    with pytest.raises(ValueError, match=r"unknown preset 'svd50' \(did you mean 'svd-50'\?\)"):
        sk.factorize(m, "svd50")
