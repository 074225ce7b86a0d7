"""Heads and FFN neurons of BERT-style blocks (structure found by duck typing, no transformers needed)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit as sk
from slimkit.prune import PrunePlan, apply_plan


class SelfAttn(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, hidden // heads
        self.all_head_size = hidden
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.attention_head_size).transpose(1, 2) for f in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v)
        return a.transpose(1, 2).reshape(b, t, -1)


class Block(nn.Module):
    """The Hugging Face BERT layout: attention.self / attention.output.dense / intermediate.dense / output.dense."""

    def __init__(self, hidden=32, heads=4, ffn=64):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = SelfAttn(hidden, heads)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, ffn)
        self.output = nn.Module()
        self.output.dense = nn.Linear(ffn, hidden)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, x):
        x = self.ln1(x + self.attention.output.dense(self.attention.self(x)))
        return self.ln2(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for blk in self.layer:
            x = blk(x)
        return x


def test_dead_heads_and_neurons_go_exactly():
    torch.manual_seed(0)
    enc = Encoder().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        for blk in enc.layer:  # heads 1 and 3 and half of the FFN neurons contribute nothing
            for h in (1, 3):
                blk.attention.output.dense.weight[:, h * 8:(h + 1) * 8] = 0
            blk.output.dense.weight[:, 32:] = 0
    p = sk.prune(enc, {"method": "structured", "sparsity": 0.5}, example_inputs=x)
    blk = p.layer[0]
    assert blk.attention.self.query.out_features == 16 and blk.attention.self.num_attention_heads == 2
    assert blk.attention.self.all_head_size == 16 and blk.attention.output.dense.in_features == 16
    assert p.slimkit_plan.keep_["layer.0.attention.self.query"]["out"] == list(range(0, 8)) + list(range(16, 24))
    assert blk.intermediate.dense.out_features == 32 and blk.output.dense.in_features == 32
    assert blk.attention.output.dense.out_features == 32  # the residual stream is left whole
    with torch.no_grad():
        assert torch.allclose(p(x), enc(x), atol=1e-5)
    again = apply_plan(enc, PrunePlan.from_dict(p.slimkit_plan.to_dict()))
    with torch.no_grad():
        assert torch.equal(again(x), p(x))
    assert enc.layer[0].attention.self.num_attention_heads == 4  # the caller's model is untouched


def test_only_ffn_and_excluded_blocks():
    enc = Encoder().eval()
    x = torch.randn(1, 3, 32)
    p = sk.prune(enc, {"sparsity": 0.25, "layers": ["layer.0.intermediate.dense", "layer.1.intermediate.dense"]},
                 example_inputs=x)
    assert p.layer[0].attention.self.num_attention_heads == 4 and p.layer[1].intermediate.dense.out_features == 48
    q = sk.prune(enc, {"sparsity": 0.5, "exclude": ["layer.1"]}, example_inputs=x)
    assert q.layer[1].intermediate.dense.out_features == 64 and q.layer[0].intermediate.dense.out_features == 32
    assert q.layer[0].attention.self.num_attention_heads == 2 and q.layer[1].attention.self.num_attention_heads == 4
    assert sk.prune(enc, {"sparsity": 0.9}, example_inputs=x).layer[0].attention.self.num_attention_heads == 1
    bad = p.slimkit_plan.to_dict()
    bad["attrs"] = {"layer.0.intermediate": {"num_attention_heads": 1}}
    with pytest.raises(ValueError, match="is not an attention module"):
        apply_plan(enc, PrunePlan.from_dict(bad))


def test_hugging_face_bert_when_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    bert = transformers.BertModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    p = sk.prune(bert, {"sparsity": 0.5}, example_inputs=batch)
    assert p.encoder.layer[0].attention.self.query.out_features == 16
    assert p.encoder.layer[1].intermediate.dense.out_features == 32
    with torch.no_grad():
        assert p(**batch).last_hidden_state.shape == (2, 8, 32)


def test_attention_that_counts_its_heads_loses_whole_heads(tmp_path):
    """OPT's attention reshapes by its own ``num_heads``: probing finds the head coupling only with
    that count cut too, the plan records it, and the pruned model computes exactly what the model
    computes with the cut heads' output columns zeroed."""
    pytest.importorskip("transformers")
    from slimkit.zoo.archs import ARCHS

    model, batch = ARCHS["opt"].build()
    p = sk.prune(model, {"sparsity": 0.5}, example_inputs=batch)
    attn = p.model.decoder.layers[0].self_attn
    assert (attn.num_heads, attn.q_proj.out_features, attn.out_proj.in_features) == (2, 16, 16)
    assert p.slimkit_plan.attrs_["model.decoder.layers.0.self_attn"] == {"num_heads": 2}
    assert model.model.decoder.layers[0].self_attn.num_heads == 4  # the caller's model is untouched
    with torch.no_grad():
        assert p(**batch).logits.shape == model(**batch).logits.shape
    sk.save(p, tmp_path / "opt")
    q = sk.load(tmp_path / "opt", ARCHS["opt"].build()[0])
    with torch.no_grad():
        assert torch.allclose(q(**batch).logits, p(**batch).logits, atol=1e-5)


class _Fused(nn.Module):
    """One fused q/k/v projection: ``split`` into q, k, v then heads (GPT-2, which splits by its
    ``split_size``), or heads then q, k, v (GPT-NeoX, whose view infers the head count)."""

    def __init__(self, layout: str, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.layout, self.num_heads, self.head_dim, self.split_size = layout, heads, dim // heads, dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, t, _ = x.shape
        y = self.qkv(x)
        if self.layout == "split":
            q, k, v = (z.view(n, t, -1, self.head_dim).transpose(1, 2) for z in y.split(self.split_size, dim=2))
        else:
            q, k, v = y.view(n, t, -1, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, -1)
        return self.proj(a)


class _FusedNet(nn.Module):
    def __init__(self, layout: str) -> None:
        super().__init__()
        self.attn, self.head = _Fused(layout), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(x + self.attn(x))


@pytest.mark.parametrize("layout", ["split", "interleaved"])
def test_fused_qkv_projection_loses_whole_heads(layout):
    """Both fused layouts lose whole heads: the pruned model computes exactly what the model computes
    with the dropped heads' output columns zeroed, and GPT-2's split width follows the cut."""
    torch.manual_seed(0)
    model, x = _FusedNet(layout).eval(), torch.randn(2, 5, 16)
    p = sk.prune(model, {"sparsity": 0.5}, example_inputs=x)
    plan = p.slimkit_plan
    assert (p.attn.qkv.out_features, p.attn.proj.in_features) == (24, 8)
    assert plan.attrs_.get("attn", {}) == ({"num_heads": 2, "split_size": 8} if layout == "split" else {})
    kept = plan.keep_["attn.proj"]["in"]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.attn.proj.weight[:, [c for c in range(16) if c not in kept]] = 0
        assert torch.allclose(p(x), ref(x), atol=1e-5)
    assert model.attn.qkv.out_features == 48  # the caller's model is untouched


def test_multihead_attention_left_whole_is_reported(caplog):
    """torch's own nn.MultiheadAttention cannot lose a head as the class it is: the plan names it
    and why, its weights count as not compressed, and the verb warns when little was cut."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 16, batch_first=True, dropout=0.0), 2).eval()
    with caplog.at_level("WARNING", logger="slimkit"):
        p = sk.prune(enc, {"sparsity": 0.5}, example_inputs=torch.randn(2, 5, 32))
    plan = p.slimkit_plan
    assert plan.skipped["layers.0.self_attn"].startswith("nn.MultiheadAttention: its heads are kept whole")
    assert "layers.1.self_attn.out_proj" in plan.skipped
    attn = sum(q.numel() for n, q in enc.named_parameters() if "self_attn" in n and q.dim() == 2)
    total = sum(q.numel() for q in enc.parameters() if q.dim() == 2)
    assert plan.coverage_["fraction"] == pytest.approx(1 - attn / total)
    assert "left alone: nn.MultiheadAttention" in plan.summary()
    assert any("structured pruning cut layers holding only" in r.getMessage() for r in caplog.records)
