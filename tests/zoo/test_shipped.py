"""The digits zoo: shipped weights for seed 0 (the same bits on every machine), trained and cached otherwise."""

import torch

from slimkit.train import accuracy
from slimkit.zoo import DIGITS_MODELS, SHIPPED, cache_dir, trained


def test_every_digits_model_ships_trained_weights(digits):
    for name in DIGITS_MODELS:
        assert (SHIPPED / f"{name}.safetensors").exists(), name
    for name in ("mlp", "mixed_cnn"):
        assert accuracy(trained(name), digits.test_x, digits.test_y) > 97.0, name


def test_another_seed_is_trained_on_first_use_and_cached(digits):
    model = trained("mlp", seed=1)
    assert accuracy(model, digits.test_x, digits.test_y) > 95.0
    assert any(p.name.startswith("mlp-") for p in (cache_dir() / "zoo").iterdir())
    again = trained("mlp", seed=1)  # from the cache: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert not torch.equal(model.state_dict()["1.weight"], trained("mlp").state_dict()["1.weight"])
