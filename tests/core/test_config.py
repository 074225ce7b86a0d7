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
    assert p["int8"]["activations"] == "static"
