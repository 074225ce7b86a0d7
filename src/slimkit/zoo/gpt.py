"""A small GPT-2-style causal language model over bytes, and a trained one for benchmarks.

``tiny_gpt()`` is the GPT-2 layout in miniature: token and position embeddings, pre-norm blocks of
causal self-attention (one fused ``qkv`` Linear, an output ``proj``) and a GELU MLP (``fc``,
``out``), a final LayerNorm, and an output head that shares the token embedding's weights (tied
embeddings, as GPT-2 does). The vocabulary is the 256 byte values, so no tokenizer is needed.

``trained_gpt()`` trains it on the standard library's docstrings (``slimkit.data.text``) for about
ten minutes on two cores and caches the weights; ``lm_windows`` and ``perplexity`` are the data and the
measure that go with it.

>>> import torch
>>> m = tiny_gpt(dim=32, layers=1, heads=2, context=16)
>>> m(torch.randint(0, 256, (2, 16))).shape
torch.Size([2, 16, 256])
>>> m.head.weight is m.embed.weight
True
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyGPT", "tiny_gpt", "trained_gpt", "lm_windows", "lm_data", "perplexity"]

log = logging.getLogger(__name__)


class _Block(nn.Module):
    causal: Tensor

    def __init__(self, dim: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.register_buffer("causal", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(self.causal[:length, :length], float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Byte-level GPT-2-style causal LM: ``model(ids [N, L]) -> logits [N, L, 256]``."""

    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 4, heads: int = 4, context: int = 128,
                 tie_embeddings: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.context = context
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, context) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(length, device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))  # type: ignore[no-any-return]


def tiny_gpt(**kwargs: int | bool) -> TinyGPT:
    return TinyGPT(**kwargs)  # type: ignore[arg-type]


def lm_windows(texts: Sequence[str], context: int) -> Tensor:
    """The texts joined by newlines as UTF-8 bytes, cut into non-overlapping ``[n, context + 1]``
    windows (inputs are ``w[:, :-1]``, next-byte targets ``w[:, 1:]``)."""
    data = torch.frombuffer(bytearray("\n".join(texts).encode()), dtype=torch.uint8).long()
    n = (len(data) - 1) // context
    if n == 0:
        raise ValueError(f"{len(data)} bytes of text make no window of {context + 1}")
    return torch.stack([data[i * context:i * context + context + 1] for i in range(n)])


def lm_data(context: int = 128) -> tuple[Tensor, Tensor]:
    """Train and test windows from the docstring corpus, split by paragraph (the last 10% of the
    shuffled paragraphs are the test text, never seen in training)."""
    from slimkit.data.text import docstring_sentences

    paras = docstring_sentences(every_paragraph=True)
    cut = int(0.9 * len(paras))
    return lm_windows(paras[:cut], context), lm_windows(paras[cut:], context)


@torch.no_grad()
def perplexity(model: Callable[[Tensor], Tensor], windows: Tensor, batch: int = 32) -> float:
    """``exp`` of the mean next-byte cross-entropy of ``model`` on ``windows`` ``[n, L + 1]``."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs windows of shape [n >= 1, L + 1 >= 2], got {tuple(windows.shape)}")
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = torch.as_tensor(model(w[:, :-1])).float()
        if not torch.isfinite(logits).all():
            raise ValueError(f"the model returned non-finite logits on windows {i}..{i + len(w) - 1}")
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(total / count)


def trained_gpt(steps: int = 4000, seed: int = 0) -> TinyGPT:
    """``tiny_gpt()`` trained on the docstring corpus (``lm_data``; AdamW, cosine schedule, batches
    of 16 windows), cached as safetensors under the zoo's cache folder; later calls load the cache."""
    from slimkit.train import fit

    from . import cache_dir, load_cached, store_cached

    model = tiny_gpt()
    key = hashlib.sha256(f"gpt-{steps}-{seed}-{torch.__version__}-v1".encode()).hexdigest()[:12]
    path = cache_dir() / "zoo" / f"tiny_gpt-{key}.safetensors"
    if load_cached(path, model, lambda state: state.__setitem__("head.weight", state["embed.weight"])):
        return model.eval()
    model = tiny_gpt()
    train, test = lm_data(model.context)
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(train) // 16
    epochs = max(1, math.ceil(steps / per_epoch))
    order = torch.randperm(len(train), generator=g)
    batches = [(train[order[i:i + 16], :-1], train[order[i:i + 16], 1:]) for i in range(0, per_epoch * 16, 16)]
    torch.manual_seed(seed)
    fit(model, batches, epochs=epochs, lr=3e-3, optimizer="adamw", weight_decay=0.01, seed=seed,
        criterion=lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))
    model.eval()
    log.info("trained tiny_gpt on docstrings (%d epochs of %d batches): test perplexity %.3f",
             epochs, len(batches), perplexity(model, test))
    store_cached(path, {k: v for k, v in model.state_dict().items() if k != "head.weight"})  # tied: stored once
    return model
