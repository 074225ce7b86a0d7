"""The layer-by-layer calibration driver: the same result as re-running the whole model per layer,
for far fewer passes; and GPTQ / AWQ on a GPT with tied embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import slimkit as sk
from slimkit.quant import sequential
from slimkit.zoo.gpt import tiny_gpt


def _gpt() -> nn.Module:
    torch.manual_seed(0)
    m = tiny_gpt(dim=64, layers=3, heads=2, context=32).eval()
    with torch.no_grad():  # some outlier input channels, as trained transformers have
        for b in m.blocks:
            b.ln1.weight[:3] = 8.0
    return m


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, h: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor]:
        m = attention_mask.unsqueeze(-1).float() if attention_mask is not None else 1.0
        return (h + self.o(torch.tanh(self.q(h))) * m,)  # a tuple, as Hugging Face layers return


class _Encoder(nn.Module):
    """Blocks called with a keyword argument (the mask), returning tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        self.layer = nn.ModuleList(_Layer() for _ in range(3))
        self.pool = nn.Linear(32, 32)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids)
        for layer in self.layer:
            h = layer(h, attention_mask=attention_mask)[0]
        return self.pool(h)


def _calls(module: nn.Module) -> list[int]:
    count = [0]
    module.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("rounding", ["gptq", "awq"])
def test_driver_matches_whole_model_passes_with_fewer_runs(rounding, monkeypatch):
    cfg = {"activations": "none", "weight_bits": 4, "group_size": 32, "rounding": rounding}
    for make, calib in (
        (_gpt, [torch.randint(0, 256, (4, 32)) for _ in range(3)]),
        (lambda: torch.manual_seed(0) and _Encoder().eval(),
         [{"input_ids": torch.randint(0, 40, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
          for _ in range(3)])):
        model = make()
        stack = sequential.repeated_blocks(model)
        assert len(stack) == 3
        last = model.get_submodule(stack[-1])
        calls = _calls(last)
        fast = sk.quantize(model, cfg, calib_data=calib)
        fast_runs = calls[0]
        monkeypatch.setattr(sequential, "repeated_blocks", lambda m: [])  # every layer from the whole model
        calls[0] = 0
        slow = sk.quantize(model, cfg, calib_data=calib)
        monkeypatch.undo()
        done = fast.slimkit_plan.passes[rounding]
        assert len(done) >= 7
        earlier = [n for n in done if any(n.startswith(b + ".") for b in stack[:-1])]
        x = calib[0]
        with torch.no_grad():
            a = fast(**x) if isinstance(x, dict) else fast(x)
            b = slow(**x) if isinstance(x, dict) else slow(x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # the last block no longer runs for the layers of the blocks before it (each gets its
        # inputs from its own block alone); it runs once per batch to have its inputs caught
        assert calls[0] - fast_runs >= len(calib) * (len(earlier) - 1)


def test_gptq_and_awq_leave_tied_embeddings_alone():
    model = _gpt()
    emb = model.embed.weight.detach().clone()
    calib = [torch.randint(0, 256, (4, 32)) for _ in range(2)]
    ids = torch.randint(0, 256, (2, 32))
    for preset in ("int4-gptq", "int4-awq"):
        q = sk.quantize(model, {**sk.presets()[preset], "group_size": 32}, calib_data=calib)
        assert torch.equal(model.embed.weight, emb)  # the caller's model, and its tie, are untouched
        assert model.head.weight is model.embed.weight
        # the output head is quantized on its own, so the tie is gone and the table is quantized too
        assert type(q.head).__name__ == "QuantLinearNBits" and type(q.embed).__name__ == "QuantEmbedding"
        with torch.no_grad():
            assert float((q.embed(ids) - model.embed(ids)).norm() / model.embed(ids).norm()) < 0.01
        with torch.no_grad():
            rel = float((q(ids) - model(ids)).norm() / model(ids).norm())
        assert rel < 0.2
