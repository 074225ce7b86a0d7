"""The layer-by-layer calibration driver: the same result as re-running the whole model per layer,
for far fewer passes; and GPTQ / AWQ on a GPT with tied embeddings."""

from __future__ import annotations

import copy

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
        q = sk.quantize(model, sk.quant.PRESETS[preset].with_weights(group_size=32), calib_data=calib)
        assert torch.equal(model.embed.weight, emb)  # the caller's model, and its tie, are untouched
        assert model.head.weight is model.embed.weight
        # the output head is quantized on its own, so the tie is gone and the table is quantized too
        assert type(q.head).__name__ == "QuantLinearNBits" and type(q.embed).__name__ == "QuantEmbedding"
        with torch.no_grad():
            rows = sk.quant.PRESETS[preset].find(sk.quant.Embeddings).bits  # int8 rows, or 4-bit groups of 32
            err = float((q.embed(ids) - model.embed(ids)).norm() / model.embed(ids).norm())
            assert err < (0.01 if rows == 8 else 0.12), (preset, err)
        with torch.no_grad():
            rel = float((q(ids) - model(ids)).norm() / model(ids).norm())
        assert rel < 0.2


class _Scaled(_Encoder):
    """Something runs between the blocks: block i + 1 does not take block i's output as it is."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids)
        for layer in self.layer:
            h = 0.5 * layer(h, attention_mask=attention_mask)[0]
        return self.pool(h)


def _encoder(cls: type[_Encoder]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _token_batches(n: int = 3) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 40, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
            for _ in range(n)]


def _catches(monkeypatch) -> list[int]:
    count = [0]
    catch = sequential._catch

    def counted(*a, **k):
        count[0] += 1
        return catch(*a, **k)

    monkeypatch.setattr(sequential, "_catch", counted)
    return count


@pytest.mark.parametrize("cls, chains", [(_Encoder, True), (_Scaled, False)])
def test_blocks_take_the_previous_blocks_output_where_the_model_chains_them(cls, chains, monkeypatch):
    """Block i + 1's inputs are block i's quantized outputs (two catches from the model, whatever
    the depth) where that is what the model does; where something runs between the blocks, the
    check on the second block sees it and every block's inputs are caught from the model. GPTQ's
    result is the same either way as with every layer's inputs from the whole model."""
    cfg = {"activations": "none", "weight_bits": 4, "group_size": 32, "rounding": "gptq"}
    model, calib = _encoder(cls), _token_batches()
    catches = _catches(monkeypatch)
    fast = sk.quantize(model, cfg, calib_data=calib)
    assert catches[0] == (2 if chains else 3)
    monkeypatch.setattr(sequential, "repeated_blocks", lambda m: [])
    slow = sk.quantize(model, cfg, calib_data=calib)
    with torch.no_grad():
        torch.testing.assert_close(fast(**calib[0]), slow(**calib[0]), rtol=1e-5, atol=1e-5)


def test_frozen_driver_runs_each_block_once_for_all_its_layers():
    model, calib = _encoder(_Encoder), _token_batches()
    names = [f"layer.{i}.{p}" for i in range(3) for p in ("q", "o")] + ["pool"]
    runs = [_calls(b) for b in model.layer]
    got = dict(sequential.sequential_inputs(model, names, calib, frozen=True))
    # per batch, each block runs once to record both its layers, its output giving the next block's
    # inputs; blocks 0 and 1 are reached from the model to catch their inputs (block 0 runs through
    # for the second catch, the check that the blocks chain), and all run for the pool's inputs
    assert [r[0] for r in runs] == [len(calib) * k for k in (1 + 2 + 1, 1 + 1 + 1, 1 + 1)]
    h = {}
    for n in names:
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: h.setdefault(n, []).append(a[0]))
    with torch.no_grad():
        for b in calib:
            model(**b)
    for n in names:
        assert len(got[n]) == len(calib)
        for x, y in zip(got[n], h[n], strict=True):
            torch.testing.assert_close(x, y)


class _QKVLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, h: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor]:
        a = torch.tanh(self.q(h)) * torch.sigmoid(self.k(h)) + self.v(h)
        return (h + self.o(a),)


class _QKVEncoder(_Encoder):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_QKVLayer() for _ in range(3))
        with torch.no_grad():
            self.embed.weight[:, :2] *= 20.0  # outlier channels in the hidden states


def test_smoothquant_calibrates_one_block_at_a_time(monkeypatch):
    """SmoothQuant and outlier channels take their inputs from the driver (group leaders only, one
    block's inputs at a time) and choose exactly what they choose from whole-model passes."""
    from slimkit.quant import smoothing as weight_passes  # the driver smoothing calls

    model, calib = _encoder(_QKVEncoder), _token_batches()
    asked = []
    driver = weight_passes.sequential_inputs

    def spy(m, names, batches, frozen=False):
        asked.append((list(names), frozen))
        return driver(m, names, batches, frozen=frozen)

    monkeypatch.setattr(weight_passes, "sequential_inputs", spy)
    fast = sk.quantize(model, "int8-smoothquant", calib_data=calib)
    assert asked == [([f"layer.{i}.{p}" for i in range(3) for p in ("q", "o")] + ["pool"], True)]
    passes = fast.slimkit_plan.passes
    assert passes["smoothquant"]["layer.0.k"]["shares_input_with"] == ["layer.0.q", "layer.0.v"]
    assert passes["outlier_channels"]["layer.0.v"] == [0, 1]
    monkeypatch.setattr(sequential, "repeated_blocks", lambda m: [])
    slow = sk.quantize(model, "int8-smoothquant", calib_data=calib)
    assert slow.slimkit_plan.passes == passes
    a, b = fast.state_dict(), slow.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Twice(_Encoder):
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.pool(self.pool(self.embed(input_ids)))


def test_smoothquant_pools_a_layer_that_runs_twice_per_pass():
    model, calib = _encoder(_Twice), _token_batches()
    shared = sk.quantize(model, "int8-smoothquant", calib_data=calib)  # one scale serves both calls
    assert "pool" in shared.slimkit_plan.passes["smoothquant"] and shared.slimkit_plan.fidelity_["cosine"] > 0.99
    q = sk.quantize(_encoder(_Twice), sk.quant.PRESETS["int8-smoothquant"].with_weights(exclude=("pool",)),
                    calib_data=_token_batches())
    assert "pool" not in q.slimkit_plan.passes["smoothquant"]


def test_a_traced_model_is_walked_once_for_all_its_layers(monkeypatch):
    """A GraphModule (BatchNorm folded by tracing: no blocks left to run alone) is walked node by
    node: each layer's inputs come with the layers before it as the caller left them, and the
    walk equals re-running the whole model per layer, in one pass instead of one per layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 5))
    gm = torch.fx.symbolic_trace(copy.deepcopy(net)).eval()
    names = ["0", "2", "4", "6"]
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    runs = [0]
    gm.register_forward_pre_hook(lambda m, a: runs.__setitem__(0, runs[0] + 1))

    def drive(model: nn.Module) -> list[list[Tensor]]:
        got = []
        for name, xs in sequential.sequential_inputs(model, names, batches):
            got.append(xs)
            with torch.no_grad():
                model.get_submodule(name).weight.mul_(0.5)  # what a rounding pass would do, layer by layer
        return got

    walked = drive(gm)
    assert runs[0] == 0  # never called as a whole: the graph is walked
    monkeypatch.setattr(sequential, "_graph_walk", lambda *a: None)
    again = drive(torch.fx.symbolic_trace(copy.deepcopy(net)).eval())  # the whole model once per layer, on a fresh copy
    for a, b in zip(walked, again, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)
    assert [tuple(x[0].shape) for x in walked] == [(2, 3, 6, 6), (2, 8, 6, 6), (2, 8, 6, 6), (2, 144)]
