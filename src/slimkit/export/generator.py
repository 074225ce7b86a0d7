"""Text generation with a file ``export_onnx(..., generative=True)`` wrote, in ONNX Runtime.

``Generator(path, tokenizer=...)`` reads the cache layout from the file's inputs, runs the prompt
(the prefill) and then one token at a time through the key/value cache: greedy, or sampled with a
temperature, top-k and top-p, from a seed; it stops at the end-of-sequence token, a stop string or
token, or ``max_new_tokens``, and calls ``on_token`` with each new token as it comes. Several
prompts run as one batch, left-padded (the attention mask hides the padding and the positions
count real tokens only).

For example (a folder that ``export_onnx(model, "out/lm/model.onnx", ids, generative=True)`` wrote)::

    g = Generator("out/lm", tokenizer="path/to/tokenizer")
    print(g.generate("def add(a, b):", max_new_tokens=16).text)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimkit.export.runtime import session

__all__ = ["Generator", "Generation"]

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One prompt's continuation and how long it took."""

    tokens: list[int]  # the new tokens
    text: str | None  # the new text (with a tokenizer)
    prompt_tokens: int
    stopped_by: str  # "eos", "stop", "max_new_tokens"
    seconds_to_first_token: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed after the first token (the prefill is ``seconds_to_first_token``)."""
        decode = self.seconds - self.seconds_to_first_token
        return (len(self.tokens) - 1) / decode if len(self.tokens) > 1 and decode > 0 else float("nan")


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not isinstance(tokenizer, (str, Path)):
        return tokenizer
    folder = Path(tokenizer)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist (give the folder a Hugging Face tokenizer "
                                "was saved to, holding tokenizer.json or its vocabulary files)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"no tokenizer could be loaded from {folder}: {e}") from e


class Generator:
    """Generate with an exported causal LM (``path``: the ``.onnx`` file, or its folder with
    ``genai_config.json``); ``tokenizer``: a Hugging Face tokenizer or its folder, or None to work
    in token ids; ``threads``: ONNX Runtime's intra-op threads."""

    def __init__(self, file: str | Path, tokenizer: Any = None, threads: int = 2) -> None:
        path = Path(file)
        config: dict[str, Any] = {}
        if path.is_dir():
            cfg_file = path / "genai_config.json"
            if not cfg_file.exists():
                raise FileNotFoundError(f"{path} is a folder without genai_config.json; give the .onnx file itself")
            config = json.loads(cfg_file.read_text())
            path = path / config["model"]["decoder"]["filename"]
        elif (path.parent / "genai_config.json").exists():
            config = json.loads((path.parent / "genai_config.json").read_text())
        if not path.exists():
            raise FileNotFoundError(f"no ONNX file at {path}")
        self.path = str(path)
        self.session = session(self.path, threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        if "input_ids" not in inputs or "attention_mask" not in inputs or not self.past_names:
            raise ValueError(f"{path.name} is not a generative export: it takes {sorted(inputs)[:6]}, not input_ids, "
                             "attention_mask and past_key_values.* (export with export_onnx(..., generative=True))")
        self.positions = "position_ids" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._past_of = {n: n.replace("present.", "past_key_values.", 1) for n in self.output_names[1:]}
        if self.output_names[0] != "logits" or sorted(self._past_of.values()) != sorted(self.past_names):
            raise ValueError(f"{path.name}: its outputs {self.output_names[:3]}... are not logits and present.* "
                             "for each past input")
        shape = inputs[self.past_names[0]].shape
        if not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise ValueError(f"{path.name}: the past inputs' heads and width are not fixed ({shape})")
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        model = config.get("model", {})
        self.context = int(model.get("context_length", 0)) or None
        self.eos = model.get("eos_token_id")
        self.tokenizer = _load_tokenizer(tokenizer)
        if self.eos is None and self.tokenizer is not None:
            self.eos = getattr(self.tokenizer, "eos_token_id", None)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray],
             position_ids: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call of the file: logits ``[batch, sequence, vocab]`` and the new past. The attention
        mask covers the past and the new tokens; a past of another length is an error."""
        lengths = {v.shape[2] for v in past.values()}
        if len(lengths) != 1 or set(past) != set(self.past_names):
            raise ValueError(f"the past must hold {len(self.past_names)} tensors of one length; got "
                             f"{len(past)} with lengths {sorted(lengths)}")
        (past_len,) = lengths
        if attention_mask.shape[1] != past_len + input_ids.shape[1]:
            raise ValueError(f"the attention mask covers {attention_mask.shape[1]} tokens, but the past holds {past_len} "
                             f"and {input_ids.shape[1]} are new: it must cover {past_len + input_ids.shape[1]}")
        feed: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64),
                                       "attention_mask": attention_mask.astype(np.int64), **past}
        if self.positions:
            if position_ids is None:
                position_ids = np.clip(np.cumsum(attention_mask, 1) - 1, 0, None)[:, -input_ids.shape[1]:]
            feed["position_ids"] = position_ids.astype(np.int64)
        out = self.session.run(None, feed)
        return out[0], {self._past_of[name]: v for name, v in zip(self.output_names[1:], out[1:], strict=True)}

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: Generator(path, tokenizer=FOLDER), or pass token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt holds no token")
        return ids

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str | int] = (), on_token: Callable[[int, str | None], None] | None = None
                 ) -> Generation:
        """Continue one prompt (text with a tokenizer, or token ids)."""
        return self.generate_batch([prompt], max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop,
                                   None if on_token is None else (lambda row, t, s: on_token(t, s)))[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 32, do_sample: bool = False,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str | int] = (),
                       on_token: Callable[[int, int, str | None], None] | None = None) -> list[Generation]:
        """Continue several prompts as one batch (left-padded); ``on_token(row, token, text)``."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0; got {temperature}, "
                             f"{top_p}, {top_k}")
        if not prompts:
            raise ValueError("generate_batch needs at least one prompt")
        rows = [self._encode(p) for p in prompts]
        longest = max(len(r) for r in rows)
        if self.context is not None and longest + max_new_tokens > self.context:
            raise ValueError(f"a prompt of {longest} tokens and {max_new_tokens} new ones exceed the model's context of "
                             f"{self.context} tokens; shorten the prompt or ask for fewer tokens")
        stop_ids = {int(s) for s in stop if isinstance(s, int)}
        stop_text = [s for s in stop if isinstance(s, str)]
        if stop_text and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; give token ids to stop at instead")
        rng = np.random.default_rng(seed)
        n = len(rows)
        ids = np.zeros((n, longest), np.int64)
        mask = np.zeros((n, longest), np.int64)
        for i, r in enumerate(rows):
            ids[i, longest - len(r):], mask[i, longest - len(r):] = r, 1
        past = self.empty_past(n)
        new: list[list[int]] = [[] for _ in rows]
        why = ["max_new_tokens"] * n
        done = np.zeros(n, bool)
        start = time.perf_counter()
        first = 0.0
        for t in range(max_new_tokens):
            logits, past = self.step(ids, mask, past)
            if t == 0:
                first = time.perf_counter() - start
            bad = [i for i in range(n) if not done[i] and not np.isfinite(logits[i, -1]).all()]
            if bad:
                raise ValueError(f"{Path(self.path).name} returned non-finite logits for prompt {bad[0]} at new token {t}; "
                                 "the file (or its inputs) is broken")
            chosen = [self._choose(logits[i, -1], do_sample, temperature, top_k, top_p, rng) for i in range(n)]
            for i, tok in enumerate(chosen):
                if done[i]:
                    continue
                if self.eos is not None and tok in (self.eos if isinstance(self.eos, list) else [self.eos]):
                    done[i], why[i] = True, "eos"
                    continue
                new[i].append(tok)
                piece = self.tokenizer.decode([tok]) if self.tokenizer is not None else None
                if on_token is not None:
                    on_token(i, tok, piece)
                if tok in stop_ids or stop_text and any(s in self.tokenizer.decode(new[i]) for s in stop_text):
                    done[i], why[i] = True, "stop"
            if done.all():
                break
            ids = np.array([[tok] for tok in chosen], np.int64)
            mask = np.concatenate([mask, np.ones((n, 1), np.int64)], 1)
        total = time.perf_counter() - start
        return [Generation(new[i], self.tokenizer.decode(new[i]) if self.tokenizer is not None else None, len(rows[i]),
                           why[i], first, total) for i in range(n)]

    @staticmethod
    def _choose(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
                rng: np.random.Generator) -> int:
        if not do_sample:
            return int(logits.argmax())
        z = logits.astype(np.float64) / temperature
        if top_k:
            kth = np.sort(z)[-min(top_k, z.size)]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest set whose mass reaches top_p
            mask = np.zeros_like(p, bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(rng.choice(p.size, p=p))
