"""The byte-level GPT: its data, its perplexity, and their bad input."""

import math

import pytest
import torch

from slimkit.zoo.gpt import lm_windows, perplexity, tiny_gpt


def test_windows_and_perplexity_of_an_untrained_model():
    w = lm_windows(["hello world", "a second text"], context=8)
    assert w.shape == (3, 9) and bytes(w[0, :5].tolist()) == b"hello"
    torch.manual_seed(0)
    m = tiny_gpt(dim=32, layers=1, heads=2, context=8).eval()
    ppl = perplexity(m, w)
    assert 200 < ppl < 320  # near-uniform over 256 bytes at initialisation
    assert math.isclose(perplexity(m, w, batch=1), ppl, rel_tol=1e-5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="make no window of 9"):
        lm_windows(["hi"], context=8)
    m = tiny_gpt(dim=32, layers=1, heads=2, context=8).eval()
    with pytest.raises(ValueError, match=r"perplexity needs windows of shape .* got \(0, 9\)"):
        perplexity(m, torch.zeros(0, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite logits on windows 0..1"):
        perplexity(lambda x: torch.full((*x.shape, 256), float("nan")), torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="dim 30 is not a multiple of heads 4"):
        tiny_gpt(dim=30, heads=4)
