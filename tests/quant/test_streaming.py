"""Quantizing a checkpoint folder block by block (``sk.quantize(folder, ...)``): the same model as
quantizing it loaded, one float block in memory at a time, and a clear error for each bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.checkpoint import Checkpoint
from slimkit.quant.weight_only import QuantLinearNBits

transformers = pytest.importorskip("transformers")


def _llama(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calib(n: int = 2, vocab: int = 128) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (2, 16), generator=g),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(n)]


INT4 = [{"weights": {"bits": 4, "group_size": 32}}, {"activations": {"mode": "none"}}]


def _saved(model: nn.Module, folder: Path, **kw: Any) -> Path:
    model.save_pretrained(str(folder), **kw)
    return folder


@pytest.mark.parametrize("rounding", [None, "gptq", "awq"])
def test_block_by_block_equals_quantizing_the_loaded_model(tmp_path: Path, rounding: str | None) -> None:
    model = _llama()
    folder = _saved(model, tmp_path / "ckpt", max_shard_size="100KB")  # several shards, blocks split across them
    assert (folder / "model.safetensors.index.json").exists()
    spec = [*INT4, *([rounding] if rounding else []), "embeddings"]
    calib = _calib()
    streamed, whole = sk.quantize(folder, spec, calib), sk.quantize(model, spec, calib)
    x = calib[0]
    assert torch.equal(streamed(**x).logits, whole(**x).logits)
    a, b = streamed.slimkit_plan, whole.slimkit_plan
    assert a.quantized_layers == b.quantized_layers and len(a.quantized_layers) == 3 * 7 + 2  # + head, embeddings
    assert a.coverage_["fraction"] == pytest.approx(b.coverage_["fraction"]) == pytest.approx(1.0)
    assert a.fidelity_["relative_l2"] == pytest.approx(b.fidelity_["relative_l2"], rel=1e-6)
    if rounding:
        assert a.passes[rounding] == b.passes[rounding]
    blocks = a.passes["streamed"]["blocks"]
    assert [s["block"] for s in blocks] == [f"model.layers.{i}" for i in range(3)]
    assert all(0 < s["relative_l2"] < 1 and s["seconds"] > 0 for s in blocks)
    assert isinstance(streamed, transformers.LlamaForCausalLM)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2-tied", "opt"])
def test_other_decoders_and_tied_embeddings(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    model = {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(  # Conv1D layers, tied head
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)),
        "qwen2-tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)),
        "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
            max_position_embeddings=32, word_embed_proj_dim=64)),
    }[arch]().eval()
    folder = _saved(model, tmp_path / arch)
    spec = [*INT4, "gptq", "embeddings"]
    calib = _calib()
    streamed, whole = sk.quantize(folder, spec, calib), sk.quantize(model, spec, calib)
    assert torch.equal(streamed(**calib[0]).logits, whole(**calib[0]).logits)
    assert streamed.slimkit_plan.quantized_layers == whole.slimkit_plan.quantized_layers
    assert streamed.slimkit_plan.skipped == whole.slimkit_plan.skipped


def test_one_float_block_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a block is loaded, every other block is on ``meta`` (those before it written to disk
    quantized, those after it not read yet), and after the first block so are the tables and head."""
    folder = _saved(_llama(), tmp_path / "ckpt")
    seen: list[tuple[str, set[str], set[str]]] = []
    load = Checkpoint.load

    def watch(self: Checkpoint, model: nn.Module, prefix: str = "", skip: tuple[str, ...] = (),
              missing_only: bool = False) -> None:
        if prefix:
            others = {t.device.type for b in model.model.layers if b is not model.get_submodule(prefix)
                      for t in [*b.parameters(), *b.buffers()]}
            seen.append((prefix, others, {model.model.embed_tokens.weight.device.type, model.lm_head.weight.device.type}))
        load(self, model, prefix, skip, missing_only)

    monkeypatch.setattr(Checkpoint, "load", watch)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the quantized blocks wait
    q = sk.quantize(folder, [*INT4, "gptq", "embeddings"], _calib())
    assert [s[0] for s in seen] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(others == {"meta"} for _, others, _ in seen)
    assert [outside for _, _, outside in seen] == [{"cpu"}, {"meta"}, {"meta"}]  # unloaded once block 0 is read
    assert not list(tmp_path.glob("slimkit-blocks-*"))  # removed once the blocks are back
    assert all(isinstance(q.model.layers[i].mlp.down_proj, QuantLinearNBits) for i in range(3))


def test_the_heads_passes_run_on_the_hidden_states_the_sweep_has(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's GPTQ is calibrated on the quantized blocks' last outputs, which the sweep already
    has: the blocks stay on disk meanwhile (not run again, not in memory beside the float head)."""
    from slimkit.quant import streaming

    folder = _saved(_llama(), tmp_path / "ckpt")
    seen: list[set[str]] = []
    passes = streaming.weight_passes

    def watch(model: nn.Module, q: Any, batches: list[Any]) -> Any:
        if hasattr(model, "lm_head"):  # the whole model: the head's passes
            seen.append({t.device.type for b in model.model.layers for t in b.parameters()})
        return passes(model, q, batches)

    monkeypatch.setattr(streaming, "weight_passes", watch)
    calib = _calib()
    q = sk.quantize(folder, [*INT4, "gptq", "embeddings"], calib)
    assert seen == [{"meta"}]
    assert "lm_head" in q.slimkit_plan.passes["gptq"]
    assert torch.equal(q(**calib[0]).logits, sk.quantize(_llama(), [*INT4, "gptq", "embeddings"], calib)(**calib[0]).logits)


def test_saved_result_loads_onto_a_skeleton(tmp_path: Path) -> None:
    folder = _saved(_llama(), tmp_path / "ckpt")
    calib = _calib()
    q = sk.quantize(folder, [*INT4, "gptq", "embeddings"], calib)
    sk.save(q, tmp_path / "q")
    base = sk.skeleton(folder)
    assert {p.device.type for p in base.parameters()} == {"meta"}
    r = sk.load(tmp_path / "q", base)
    assert not any(t.device.type == "meta" for t in [*r.parameters(), *r.buffers()])
    assert torch.equal(r(**calib[0]).logits, q(**calib[0]).logits)
    assert isinstance(r.model.layers[0].mlp.up_proj, QuantLinearNBits)


def test_dynamic_int8_block_by_block(tmp_path: Path) -> None:
    model = _llama()
    folder = _saved(model, tmp_path / "ckpt")
    calib = _calib()
    streamed, whole = sk.quantize(folder, "int8-dynamic", calib), sk.quantize(model, "int8-dynamic", calib)
    assert torch.equal(streamed(**calib[0]).logits, whole(**calib[0]).logits)


class _Held(nn.Module):
    """A stack of blocks whose attention holds its own weight (``in_proj_weight``), built from a config."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(_HeldBlock(d) for _ in range(config.num_hidden_layers))
        self.head = nn.Linear(d, config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class _HeldBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ff = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return h + torch.relu(self.ff(h))


def test_weights_a_block_holds_itself_are_quantized_with_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from slimkit.quant.streaming import quantize_checkpoint

    config = transformers.PretrainedConfig(vocab_size=96, hidden_size=64, num_hidden_layers=3)
    torch.manual_seed(0)
    model = _Held(config).eval()
    folder = tmp_path / "held"
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    calib = [torch.randint(0, 96, (2, 16)) for _ in range(2)]
    spec = sk.quant.resolve_quantize([*INT4, "gptq", "embeddings"])
    streamed, whole = quantize_checkpoint(folder, spec, calib, model_class=_Held), sk.quantize(model, spec, calib)
    # the whole-model sweep rounds held weights after every layer's calibration; block by block, each
    # block's are rounded before the next block is calibrated: the same grid, within the noise of each other
    x, ref = calib[0], model(calib[0])
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    noise = rel(whole(x), ref)
    assert rel(streamed(x), whole(x)) < noise and rel(streamed(x), ref) < 1.25 * noise
    a, b = streamed.slimkit_plan, whole.slimkit_plan
    assert a.quantized_layers == b.quantized_layers
    assert a.passes["held_weights"] == b.passes["held_weights"]
    assert [n for n, _ in streamed.named_buffers() if n.endswith("in_proj_weight_q")] == \
        [f"blocks.{i}.attn.in_proj_weight_q" for i in range(3)]
    assert a.passes["held_weights"]["weights"] == [f"blocks.{i}.attn.in_proj_weight" for i in range(3)]


def _drop(folder: Path, key: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    del state[key]
    save_file(state, str(folder / "model.safetensors"))


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    calib = _calib()
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        sk.quantize(tmp_path / "nowhere", "int4-gptq", calib)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        sk.quantize(tmp_path / "empty", "int4-gptq", calib)
    pickled = _saved(_llama(), tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin would have to be unpickled"):
        sk.quantize(pickled, "int4-gptq", calib)
    missing = _saved(_llama(), tmp_path / "missing")
    _drop(missing, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(KeyError, match="model.layers.1.mlp.down_proj.weight"):
        sk.quantize(missing, "int4-gptq", calib)
    shape = _saved(_llama(), tmp_path / "shape")
    cfg = json.loads((shape / "config.json").read_text())
    (shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\).*expects \(96, 64\)"):
        sk.quantize(shape, "int4-gptq", calib)
    truncated = _saved(_llama(), tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        sk.quantize(truncated, "int4-gptq", calib)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        sk.quantize(tmp_path / "garbage", "int4-gptq", calib)
    index = _saved(_llama(), tmp_path / "index", max_shard_size="100KB")
    first = sorted(index.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f"{first.name} is missing"):
        sk.quantize(index, "int4-gptq", calib)


def test_passes_that_need_the_whole_model_are_refused(tmp_path: Path) -> None:
    folder = _saved(_llama(), tmp_path / "ckpt")
    calib = _calib()
    with pytest.raises(ValueError, match="static activations are calibrated on the whole model"):
        sk.quantize(folder, "int8", calib)
    with pytest.raises(ValueError, match="SmoothQuant.*need the whole model"):
        sk.quantize(folder, "int8-smoothquant", calib)
    with pytest.raises(ValueError, match="needs calib_data"):
        sk.quantize(folder, "int4-weight")
    with pytest.raises(ValueError, match="inplace=True"):
        sk.quantize(folder, "int4-weight", calib, inplace=True)
    with pytest.raises(ValueError, match="no stack of repeated blocks"):
        one = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4))
        sk.quantize(_saved(one, tmp_path / "one"), "int4-weight", calib)
