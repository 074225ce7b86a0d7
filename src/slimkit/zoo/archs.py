"""Tiny random-weight architectures for breadth testing: what users bring, in miniature.

``ARCHS[name].build()`` returns ``(model, batch)``: the model in eval mode, its weights drawn after
``torch.manual_seed(0)`` (so two builds are identical), and an example batch as slimkit takes one
(a tensor is ``model(x)``, a dict ``model(**x)``). Nothing is downloaded: the Hugging Face models
are built from small configs (hidden 32-64, 2 layers, 4 heads, vocabulary 128, 32x32 images), and
``transformers`` is imported only when one of them is built, so this module imports without it.
Decoder LMs keep their default config (``use_cache`` included), as users' models do.

>>> model, batch = ARCHS["depthwise-cnn"].build()
>>> model(batch).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["Arch", "ARCHS", "Batch", "Family"]

Family = Literal["decoder", "encoder", "encoder-decoder", "vision", "cnn", "speech", "torch"]
Batch = Tensor | tuple[Tensor, ...] | dict[str, Tensor]
VOCAB, BATCH, SEQ, IMAGE = 128, 2, 8, 32


@dataclass(frozen=True)
class Arch:
    """One architecture: its name, its family and how to build it with an example batch."""

    name: str
    family: Family
    build: Callable[[], tuple[nn.Module, Batch]]


def _text() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0  # a padded row, as a tokenizer's batch has
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), "attention_mask": mask}


def _pixels(channels: int = 3, size: int = IMAGE, seed: int = 1) -> Tensor:
    return torch.randn(BATCH, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _images() -> dict[str, Tensor]:
    return {"pixel_values": _pixels()}


def _settle_bn(model: nn.Module) -> None:
    """Running BatchNorm statistics from one random batch (seed 3, not the example batch's): with
    the initial ones (mean 0, variance 1) and random weights, activations die out layer by layer
    and the output no longer depends on the input."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: exactly this batch's statistics
        bn.train()
    with torch.no_grad():
        x = _pixels(channels, seed=3)
        model(pixel_values=x) if hasattr(model, "config") else model(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def _hf(model_cls: str, config_cls: str, batch: Callable[[], Batch],
        **config: Any) -> Callable[[], tuple[nn.Module, Batch]]:
    """A builder for ``transformers.<model_cls>(transformers.<config_cls>(**config))``."""

    def build() -> tuple[nn.Module, Batch]:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(cfg).eval()
        _settle_bn(model)
        return model, batch()

    return build


def _torch(factory: Callable[[], nn.Module],
           batch: Callable[[], Batch]) -> Callable[[], tuple[nn.Module, Batch]]:
    def build() -> tuple[nn.Module, Batch]:
        torch.manual_seed(0)
        model = factory().eval()
        _settle_bn(model)
        return model, batch()

    return build


class DepthwiseCNN(nn.Module):
    """MobileNet-style: a stem, a depthwise 3x3 and a pointwise 1x1 conv, each with BatchNorm."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))  # type: ignore[no-any-return]


class PaddingCNN(nn.Module):
    """String paddings, ``'same'`` (odd and even kernels) and ``'valid'``, then a flatten."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding="same")
        self.c2 = nn.Conv2d(16, 16, 4, padding="same")
        self.c3 = nn.Conv2d(16, 16, 3, padding="valid")  # 32 -> 30
        self.pool = nn.AdaptiveAvgPool2d(5)  # a factor of 30: ONNX exports only those
        self.head = nn.Linear(16 * 5 * 5, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x)) + x
        return self.head(torch.flatten(self.pool(torch.relu(self.c3(x))), 1))  # type: ignore[no-any-return]


class TorchTransformerLM(nn.Module):
    """Embedding, ``nn.TransformerEncoder(batch_first=True)`` and a Linear head over token ids."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(ids)))  # type: ignore[no-any-return]


def _ids() -> Tensor:
    return _text()["input_ids"]


def _zoo(name: str) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        from slimkit.zoo import digits_model

        return digits_model(name)

    return factory


def _tiny_gpt() -> nn.Module:
    from slimkit.zoo.gpt import tiny_gpt

    return tiny_gpt(vocab=VOCAB, dim=32, layers=2, heads=4, context=16)


def _seq2seq() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(2)
    return {**_text(), "decoder_input_ids": torch.randint(0, VOCAB, (BATCH, 5), generator=g)}


def _audio() -> dict[str, Tensor]:
    return {"input_values": torch.randn(BATCH, 1600, generator=torch.Generator().manual_seed(1))}


# Hugging Face initializes with std 0.02, under which a 32-wide layer adds little to the residual
# stream and quantization error hardly reaches the output; 0.1 makes every layer count.
_INIT = {"initializer_range": 0.1}
_LM = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "max_position_embeddings": 64, **_INIT}
_GQA = {**_LM, "num_key_value_heads": 2}
_ENC = {**_LM, "type_vocab_size": 2}
_VIT = {"image_size": IMAGE, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, **_INIT}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32}
_STAGES = {"hidden_sizes": [16, 32], "depths": [1, 1]}
_W2V = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "conv_dim": (16, 32), "conv_stride": (5, 2),
        "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4, **_INIT}
_Builder = Callable[[], tuple[nn.Module, Batch]]


def _lm(model_cls: str, config_cls: str, **config: Any) -> _Builder:
    return _hf(model_cls, config_cls, _text, **config)


def _vision(model_cls: str, config_cls: str, **config: Any) -> _Builder:
    return _hf(model_cls, config_cls, _images, **config)


_SPECS: list[tuple[str, Family, _Builder]] = [
    ("llama", "decoder", _lm("LlamaForCausalLM", "LlamaConfig", **_LM)),
    ("llama-gqa", "decoder", _lm("LlamaForCausalLM", "LlamaConfig", **_GQA)),
    ("qwen2", "decoder", _lm("Qwen2ForCausalLM", "Qwen2Config", **_GQA)),
    ("mistral", "decoder", _lm("MistralForCausalLM", "MistralConfig", **_GQA)),
    ("gemma", "decoder", _lm("GemmaForCausalLM", "GemmaConfig", **_GQA, head_dim=8)),
    ("phi", "decoder", _lm("PhiForCausalLM", "PhiConfig", **_LM)),
    ("gpt2", "decoder", _lm("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2,
                            n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **_INIT)),
    ("opt", "decoder", _lm("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=32,
                           ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=64, init_std=0.1)),
    ("gpt-neox", "decoder", _lm("GPTNeoXForCausalLM", "GPTNeoXConfig", **_LM)),
    ("mixtral", "decoder", _lm("MixtralForCausalLM", "MixtralConfig", **_GQA,
                               num_local_experts=4, num_experts_per_tok=2)),
    ("qwen2-moe", "decoder", _lm("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_GQA, **_MOE)),
    ("tiny-gpt", "decoder", _torch(_tiny_gpt, _ids)),
    ("bert", "encoder", _lm("BertModel", "BertConfig", **_ENC)),
    ("distilbert", "encoder", _lm("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=32,
                                  hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
                                  **_INIT)),
    ("albert", "encoder", _lm("AlbertModel", "AlbertConfig", **_ENC, embedding_size=16)),
    ("roberta", "encoder", _lm("RobertaModel", "RobertaConfig",
                               **{**_ENC, "max_position_embeddings": 72})),
    ("t5", "encoder-decoder", _hf("T5ForConditionalGeneration", "T5Config", _seq2seq,
                                  vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                  num_heads=4, decoder_start_token_id=0)),
    ("vit", "vision", _vision("ViTModel", "ViTConfig", **_VIT)),
    ("deit", "vision", _vision("DeiTModel", "DeiTConfig", **_VIT)),
    ("swin", "vision", _vision("SwinModel", "SwinConfig", image_size=IMAGE, patch_size=4,
                               embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                               **_INIT)),
    # layer scale starts at 1e-6 by default, which hides every block behind the residual
    ("convnext", "vision", _vision("ConvNextModel", "ConvNextConfig", num_stages=2, **_STAGES,
                                   layer_scale_init_value=1.0, **_INIT)),
    ("hf-resnet", "vision", _vision("ResNetModel", "ResNetConfig", embedding_size=16, **_STAGES,
                                    layer_type="basic")),
    ("hf-mobilenet-v2", "vision", _vision("MobileNetV2Model", "MobileNetV2Config",
                                          image_size=IMAGE, depth_multiplier=0.35,
                                          finegrained_output=False)),
    ("wav2vec2", "speech", _hf("Wav2Vec2Model", "Wav2Vec2Config", _audio, **_W2V)),
    ("torch-transformer", "torch", _torch(TorchTransformerLM, _ids)),
    ("depthwise-cnn", "cnn", _torch(DepthwiseCNN, _pixels)),
    ("padding-cnn", "cnn", _torch(PaddingCNN, _pixels)),
    ("zoo-resnet18", "cnn", _torch(_zoo("resnet18"), lambda: _pixels(1))),
    ("zoo-mobilenet-v2", "cnn", _torch(_zoo("mobilenet_v2"), lambda: _pixels(1))),
    ("zoo-mlp", "torch", _torch(_zoo("mlp"), lambda: _pixels(1))),
]

ARCHS: dict[str, Arch] = {name: Arch(name, family, build) for name, family, build in _SPECS}
