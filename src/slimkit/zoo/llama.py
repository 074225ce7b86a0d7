"""A trained decoder with a Hugging Face architecture: ``LlamaForCausalLM`` in miniature (RMSNorm,
rotary positions, grouped-query attention, a gated MLP) over the 256 byte values, trained once on
the docstring corpus (``gpt.lm_data``) and cached, so that generation, its export and its
quantization are measured on trained weights, with the real model class and its key/value cache.

Byte 0 (NUL, absent from the text) is the begin, end and padding token. ``ByteTokenizer`` is the
matching tokenizer for ``Generator``: UTF-8 bytes in, text out.

>>> m = tiny_llama()
>>> type(m).__name__, m.config.num_key_value_heads < m.config.num_attention_heads
('LlamaForCausalLM', True)
>>> ByteTokenizer()("hi")["input_ids"], ByteTokenizer().decode([104, 105])
([104, 105], 'hi')
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["tiny_llama", "trained_llama", "ByteTokenizer", "LLAMA_CONFIG", "lm_logits"]

log = logging.getLogger(__name__)

LLAMA_CONFIG: dict[str, Any] = {
    "vocab_size": 256, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "tie_word_embeddings": False,
}


def tiny_llama(**overrides: Any) -> nn.Module:
    """An untrained ``LlamaForCausalLM`` of ``LLAMA_CONFIG`` (1.25 M parameters)."""
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_CONFIG, **overrides})).eval()


class ByteTokenizer:
    """UTF-8 bytes as token ids (the vocabulary of ``tiny_llama``)."""

    eos_token_id = 0

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode(errors="replace")


def lm_logits(model: nn.Module) -> Any:
    """``ids -> logits`` of a Hugging Face causal LM, cache-free (what ``gpt.perplexity`` takes)."""
    return lambda x: model(input_ids=x, use_cache=False).logits


def trained_llama(steps: int = 3000, seed: int = 0) -> nn.Module:
    """``tiny_llama()`` trained on the docstring corpus (AdamW, cosine schedule, batches of 16
    windows of 128 bytes), cached as safetensors under the zoo's cache folder; later calls load it."""
    from slimkit.train import fit

    from . import cache_dir, load_cached, store_cached
    from .gpt import lm_data, perplexity

    model = tiny_llama()
    key = hashlib.sha256(f"llama-{steps}-{seed}-{torch.__version__}-{sorted(LLAMA_CONFIG.items())}-v1".encode()
                         ).hexdigest()[:12]
    path = cache_dir() / "zoo" / f"tiny_llama-{key}.safetensors"
    if load_cached(path, model):
        return model.eval()
    model = tiny_llama()
    train, test = lm_data(128)
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(train) // 16
    epochs = max(1, math.ceil(steps / per_epoch))
    order = torch.randperm(len(train), generator=g)
    batches = [(train[order[i:i + 16], :-1], train[order[i:i + 16], 1:]) for i in range(0, per_epoch * 16, 16)]

    class _Logits(nn.Module):  # fit calls model(x); the Llama takes input_ids and returns an output object
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(input_ids=x, use_cache=False).logits

    torch.manual_seed(seed)
    fit(_Logits(model), batches, epochs=epochs, lr=3e-3, optimizer="adamw", weight_decay=0.01, seed=seed,
        criterion=lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))
    model.eval()
    log.info("trained tiny_llama on docstrings (%d epochs of %d batches): test perplexity %.3f",
             epochs, len(batches), perplexity(lm_logits(model), test))
    store_cached(path, model.state_dict())
    return model
