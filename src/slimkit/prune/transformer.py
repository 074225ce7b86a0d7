"""Channel groups of BERT-style transformer blocks: attention heads and FFN neurons.

Hugging Face encoders do not trace with plain torch.fx, and their tensors are [batch, tokens,
features], so the layout propagation of ``dependency.py`` does not apply. The coupling inside a
block is fixed, though, and is found here by structure (duck typing, no import of transformers):
a block with ``attention.self.{query,key,value}`` (and ``attention_head_size``),
``attention.output.dense``, ``intermediate.dense`` and ``output.dense`` gives

- an FFN group: ``intermediate.dense`` output neurons = ``output.dense`` input features;
- a heads group: head ``h`` is rows ``h*d:(h+1)*d`` of query, key and value and the same columns of
  ``attention.output.dense`` (``d`` = head size), so whole heads go together.

The residual stream (hidden size) is shared by every block and the embeddings and is left whole.
"""

from __future__ import annotations

from torch import nn

from .dependency import Group, Member

__all__ = ["transformer_blocks", "transformer_groups", "HEAD_ATTRS"]

HEAD_ATTRS = ("num_attention_heads", "all_head_size")  # what apply updates on a self-attention module


def _linear(m: nn.Module, path: str) -> nn.Linear | None:
    try:
        sub = m.get_submodule(path)
    except AttributeError:
        return None
    return sub if isinstance(sub, nn.Linear) else None


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the BERT-style blocks of ``model``."""
    out = []
    for name, m in model.named_modules():
        paths = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
        if all(_linear(m, p) is not None for p in paths) and hasattr(m.get_submodule("attention.self"),
                                                                       "attention_head_size"):
            out.append(name)
    return out


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def transformer_groups(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[Group]:
    groups = []
    for b in transformer_blocks(model):
        pre = f"{b}." if b else ""
        blk = model.get_submodule(b) if b else model
        attn = blk.get_submodule("attention.self")
        d = int(attn.attention_head_size)  # type: ignore[arg-type]
        q = _linear(blk, "attention.self.query")
        assert q is not None
        heads = q.out_features // d
        names = [f"{pre}attention.self.{x}" for x in ("query", "key", "value")]
        g = Group(heads, [Member(n, "out", 0, d) for n in names] + [Member(f"{pre}attention.output.dense", "in", 0, d)])
        if any(_excluded(n, exclude) for n in names + [f"{pre}attention.output.dense"]):
            g.frozen = "excluded"
        groups.append(g)
        inter = _linear(blk, "intermediate.dense")
        assert inter is not None
        f = Group(inter.out_features, [Member(f"{pre}intermediate.dense", "out"), Member(f"{pre}output.dense", "in")])
        if any(_excluded(f"{pre}{x}", exclude) for x in ("intermediate.dense", "output.dense")):
            f.frozen = "excluded"
        groups.append(f)
    return groups
