"""Export of Hugging Face causal language models for generation: one ONNX graph that takes the
key/value cache of the tokens so far and returns the next one's, in the layout onnxruntime-genai
reads (with its ``genai_config.json`` beside the file).

Inputs: ``input_ids [batch, sequence]``, ``attention_mask [batch, total_sequence]`` (past and new
tokens), ``position_ids [batch, sequence]`` where the model takes them, and for each layer ``i``
``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads, past_sequence, head_dim]``. Outputs:
``logits [batch, sequence, vocab]`` and ``present.{i}.key`` / ``.value`` (the past with the new
tokens appended). A prompt is run with a past of length 0 (the prefill), then one token at a time.

Parity is checked on generation itself: PyTorch's ``generate`` (greedy) gives a continuation of
the example prompt; ONNX Runtime runs the prefill and then the continuation token by token through
the cache. A float model must pick the same tokens with logits within 1e-4; a quantized one must
be about as close to the float model's logits on that path as the PyTorch result is (``Parity``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.files import temp_file
from slimkit.core.plans import has_plan, reference_of
from slimkit.export.lint import LintReport, lint
from slimkit.export.runtime import Parity, _rel, session
from slimkit.export.writing import traced, write_checked

__all__ = ["CacheLayout", "GenerativeReport", "cache_layout", "export_generative", "decode_path", "KVStep",
           "PARITY_TOKENS"]

log = logging.getLogger(__name__)

PARITY_TOKENS = 8  # new tokens the parity check generates after the example prompt
# MatMulNBits' compute for 4-bit layers in a decoding file: int8 activations. A decoding step reads
# every weight once (memory-bound); on a 125 M Llama, 2 threads, it runs 1.6x the tokens per second
# of float compute (benchmarks/results/llm_generate.md)
DECODE_ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class CacheLayout:
    """How a causal LM's cache looks: its layers, key/value heads and head width, and the names."""

    layers: int
    kv_heads: int
    head_dim: int
    positions: bool  # whether the model takes position_ids
    vocab: int

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *(["position_ids"] if self.positions else []), *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}


@dataclass
class GenerativeReport:
    """What ``export_generative`` wrote and how the file generated against PyTorch."""

    path: str
    config_path: str
    inputs: list[str]
    outputs: list[str]
    parity: Parity
    lint: LintReport
    size_bytes: int
    layout: CacheLayout
    tokens_torch: list[int] = field(default_factory=list)
    tokens_file: list[int] = field(default_factory=list)


def _not_causal_lm(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        return (f"{type(model).__name__} is not a Hugging Face causal language model (it needs a config and generate); "
                "generative=True exports models such as LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel")
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder; generative=True exports decoder-only causal LMs"
    if _cache_arg(model) is None:
        return f"{type(model).__name__}.forward takes no cache (past_key_values): it has no key/value cache to export"
    return None


def _cache_arg(model: nn.Module) -> str | None:
    """The name the model's forward takes its cache under (``cache`` in transformers 5, earlier
    ``past_key_values``), or None."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def _returned_cache(out: Any) -> Any:
    for name in ("cache", "past_key_values"):
        found = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
        if found is not None:
            return found
    return None


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"the model returned a {type(cache).__name__} cache, not transformers' layered Cache")
    out: list[torch.Tensor] = []
    for i, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
            raise ValueError(f"cache layer {i} ({type(layer).__name__}) holds no [batch, heads, length, dim] "
                             "keys and values; only full-attention key/value caches are exported")
        out += [keys, values]
    return out


def cache_layout(model: nn.Module, input_ids: torch.Tensor) -> CacheLayout:
    """Run ``model`` once on ``input_ids`` with its cache and read the cache's shapes."""
    why = _not_causal_lm(model)
    if why:
        raise ValueError(why)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
    cache = _returned_cache(out)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no key/value cache with use_cache=True")
    tensors = _cache_tensors(cache)
    shapes = {tuple(t.shape[i] for i in (1, 3)) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"the cache's layers differ in heads or width ({sorted(shapes)}); not exported")
    (heads, dim), = shapes
    positions = "position_ids" in inspect.signature(model.forward).parameters
    return CacheLayout(len(tensors) // 2, int(heads), int(dim), positions, int(out.logits.shape[-1]))


class KVStep(nn.Module):
    """One call of a causal LM with its cache as flat tensors: ``(input_ids, attention_mask,
    [position_ids], past...) -> (logits, present...)``, the graph that is exported."""

    def __init__(self, model: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        kw: dict[str, Any] = {}
        if self.layout.positions:
            kw["position_ids"], rest = rest[0], rest[1:]
        pairs = [(rest[2 * i], rest[2 * i + 1]) for i in range(self.layout.layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)  # type: ignore[arg-type]
        kw[_cache_arg(self.model) or "past_key_values"] = cache
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kw)
        return (out.logits, *_cache_tensors(_returned_cache(out)))


def decode_path(sess: Any, layout: CacheLayout, prompt: np.ndarray, tokens: list[int] | None, steps: int
                ) -> tuple[list[int], np.ndarray]:
    """Run ``prompt [1, T]`` (the prefill), then ``steps`` tokens one at a time through the cache:
    the given ``tokens`` (teacher forced) or, without them, each step's greedy choice. Returns the
    tokens and the logits that chose each ``[steps, vocab]``."""
    names = {i.name for i in sess.get_inputs()}
    past = layout.empty_past(1)
    ids, length, chosen, logits = prompt.astype(np.int64), 0, [], []
    for step in range(steps):
        feed = {"input_ids": ids, "attention_mask": np.ones((1, length + ids.shape[1]), np.int64), **past}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(length, length + ids.shape[1], dtype=np.int64)[None]
        out = sess.run(None, {k: v for k, v in feed.items() if k in names})
        logits.append(out[0][0, -1])
        nxt = tokens[step] if tokens is not None else int(out[0][0, -1].argmax())
        chosen.append(nxt)
        length += ids.shape[1]
        past = dict(zip(layout.past_names, out[1:], strict=True))
        ids = np.array([[nxt]], np.int64)
    return chosen, np.stack(logits)


def _torch_path(model: nn.Module, prompt: torch.Tensor, tokens: list[int]) -> np.ndarray:
    """The logits ``model`` gives for each of ``tokens`` after ``prompt`` (one cache-free pass)."""
    seq = torch.cat([prompt, torch.tensor([tokens[:-1]], dtype=prompt.dtype)], 1)
    with torch.no_grad():
        out = model(input_ids=seq, use_cache=False)
    return out.logits[0, prompt.shape[1] - 1:].float().numpy()


def _prompt(example_inputs: Any) -> torch.Tensor:
    ids = example_inputs.get("input_ids") if isinstance(example_inputs, Mapping) else example_inputs
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError("generative=True takes token ids [batch, sequence] (a tensor, or a dict with input_ids) "
                         f"as example_inputs; got {type(ids).__name__}")
    mask = example_inputs.get("attention_mask") if isinstance(example_inputs, Mapping) else None
    row = ids[:1]
    if isinstance(mask, torch.Tensor):
        row = row[:, mask[0].bool()]
    if row.shape[1] < 1:
        raise ValueError("the example prompt holds no token")
    return row


# model types onnxruntime-genai runs as decoders with separate key and value caches; any other
# decoder (GPT-2's type there expects the cache as one combined tensor per layer) runs as "llama",
# its generic decoder-only pipeline, which reads the names given in the config
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo", "nemotron")


def _genai_type(cfg: Any) -> str:
    kind = str(getattr(cfg, "model_type", "llama"))
    return kind if kind in GENAI_TYPES else "llama"


def genai_config(model: nn.Module, layout: CacheLayout, filename: str) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for the exported file."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or layout.kv_heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or heads * layout.head_dim
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    eos = getattr(cfg, "eos_token_id", None)
    pad = getattr(cfg, "pad_token_id", None)
    inputs: dict[str, str] = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if layout.positions:
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "bos_token_id": getattr(cfg, "bos_token_id", None) if getattr(cfg, "bos_token_id", None) is not None else 0,
            "context_length": int(context),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": layout.head_dim,
                "hidden_size": int(hidden),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(heads),
                "num_hidden_layers": layout.layers,
                "num_key_value_heads": layout.kv_heads,
            },
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else (eos if isinstance(eos, int) else 0),
            "type": _genai_type(cfg),
            "vocab_size": layout.vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": int(context), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def export_generative(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, check: bool = True,
                      tolerance: float | None = None, accuracy_level: int | None = DECODE_ACCURACY_LEVEL
                      ) -> GenerativeReport:
    """Write ``model`` (a Hugging Face causal LM, float or quantized) to ``path`` as one decoding
    step with its key/value cache, and ``genai_config.json`` beside it; check generation in ONNX
    Runtime against PyTorch (see the module docstring). Both files are written atomically.
    ``accuracy_level``: MatMulNBits' compute for 4-bit layers (4: int8 activations, the default
    for decoding, which is memory-bound; None: float)."""
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level is MatMulNBits' 0-4 (or None), got {accuracy_level!r}")
    from slimkit.export.onnx import (
        ParityError,
        _eager_attention,
        _half_plan,
        _no_fastpath,
        default_tolerance,
        int4_export,
        opset_for,
    )
    from slimkit.export.rewrite import slim_quantized, store_half

    half = _half_plan(model)
    if half is not None and half.compute == "half":
        raise ValueError(f"generative export of a model computing in {half.dtype} is not written yet (its key/value "
                         f"cache would be 16-bit, the runner's FP32); export the "
                         f"'{'fp16' if half.dtype == 'float16' else 'bf16'}-weights' form (16-bit weights, FP32 "
                         "arithmetic), or the plain forward with sk.export_onnx(..., generative=False)")

    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the output path should end in .onnx, got {path}")
    why = _not_causal_lm(model)
    if why:
        raise ValueError(why)
    for name, m in model.named_modules():
        reason = getattr(m, "export_error", None)
        if reason:
            raise ValueError(f"layer {name!r} cannot be exported: {reason}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    prompt = _prompt(example_inputs)
    with _eager_attention(model), int4_export(model, "export_accuracy_level", accuracy_level):
        layout = cache_layout(model, prompt)
        step = KVStep(model, layout).eval()
        past_len = 2
        ids = prompt[:, : max(1, min(3, prompt.shape[1]))]
        past = [torch.zeros(1, layout.kv_heads, past_len, layout.head_dim) for _ in layout.past_names]
        args: list[torch.Tensor] = [ids, torch.ones(1, past_len + ids.shape[1], dtype=torch.long)]
        if layout.positions:
            args.append(torch.arange(past_len, past_len + ids.shape[1])[None])
        dynamic: dict[str, dict[int, str]] = {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
            **{n: {0: "batch_size", 2: "past_sequence_length"} for n in layout.past_names},
            **{n: {0: "batch_size", 2: "total_sequence_length"} for n in layout.present_names}}

        def export(f: Any) -> None:
            with warnings.catch_warnings(), torch.no_grad(), _no_fastpath():
                warnings.simplefilter("ignore")
                torch.onnx.export(step, tuple(args + past), f, input_names=layout.input_names,  # type: ignore[arg-type]
                                  output_names=layout.output_names, opset_version=opset_for(model), dynamo=False,
                                  dynamic_axes={k: v for k, v in dynamic.items()
                                                if k in layout.input_names + layout.output_names},
                                  do_constant_folding=True)

        proto = traced(export, model, path.parent)
    quantized = has_plan(model, "quant")
    if quantized:
        slim_quantized(proto)
    if half is not None:  # fp16-weights / bf16-weights: the weights stored in 16 bits, FP32 arithmetic
        store_half(proto, half.dtype)
    config = genai_config(model, layout, path.name)

    def checked(tmp: str) -> tuple[Parity, list[int], list[int], LintReport]:
        parity, torch_tokens, file_tokens = _check(model, tmp, layout, prompt, quantized, tolerance, default_tolerance)
        if check and (not parity.ok or not quantized and file_tokens != torch_tokens):  # float: the same tokens
            raise ParityError(f"ONNX Runtime does not generate what PyTorch generates with {path.name}: {parity} "
                              f"(tokens: PyTorch {torch_tokens}, file {file_tokens})")
        return parity, torch_tokens, file_tokens, lint(tmp)

    (parity, torch_tokens, file_tokens, report_lint), size = write_checked(proto, path, checked)
    del proto
    config_path = path.parent / "genai_config.json"
    fd, tmp = temp_file(path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, config_path)
    log.info("exported %s for generation (%.1f kB, %d layers' cache): %s", path, size / 1e3, layout.layers, parity)
    return GenerativeReport(str(path), str(config_path), layout.input_names, layout.output_names, parity, report_lint,
                            size, layout, torch_tokens, file_tokens)


def _check(model: nn.Module, path: str, layout: CacheLayout, prompt: torch.Tensor, quantized: bool,
           tolerance: float | None, default_tolerance: Any) -> tuple[Parity, list[int], list[int]]:
    """Greedy generation in PyTorch, then the same path through the file's cache."""
    with torch.no_grad():
        generate: Any = model.generate
        generated = generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=PARITY_TOKENS,
                             min_new_tokens=PARITY_TOKENS, do_sample=False,
                             pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
    tokens = generated[0, prompt.shape[1]:].tolist()
    sess = session(path)
    file_tokens, _ = decode_path(sess, layout, prompt.numpy(), None, len(tokens))
    _, got = decode_path(sess, layout, prompt.numpy(), tokens, len(tokens))  # on PyTorch's path
    ref = _torch_path(model, prompt, tokens)
    rel = _rel([got], [ref])
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    tol = tolerance if tolerance is not None else default_tolerance(model)
    file_vs, model_vs = None, None
    reference = reference_of(model) if quantized and tolerance is None else None
    if reference is not None:
        floats = _torch_path(reference, prompt, tokens)
        file_vs, model_vs = _rel([got], [floats]), _rel([ref], [floats])
    return Parity(rel, float(np.max(np.abs(got - ref))), top1, tol, file_vs, model_vs), tokens, file_tokens
