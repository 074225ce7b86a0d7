"""Benchmark: which settings the INT4 presets should have -- group size, zero-points, GPTQ's
act-order, 4-bit embedding tables -- measured on the two trained transformers slimkit has, in one run.

For each of ``int4-weight`` (round to nearest), ``int4-gptq`` and ``int4-awq``, the preset as it ships
(``current``) and variants of its weight grid (groups of 128 / 64 / 32, symmetric or with zero-points;
GPTQ with and without act-order), and the best-looking grids again with 4-bit embedding rows, are
applied to

- ``slimkit.zoo.llama.trained_llama()`` (the trained zoo ``LlamaForCausalLM`` over bytes): perplexity
  per byte of the generative ONNX file on held-out docstring windows (calibration: 128 training
  windows), and
- all-MiniLM-L6-v2: mean cosine of the ONNX file's sentence embeddings with FP32's on 512 held-out
  docstring paragraphs (calibration: 128 others),

each with its file size as a fraction of the FP32 file's. Loss is ``ppl / ppl_FP32 - 1`` and
``1 - cosine``. Decoding speed depends on the grid too (more groups: more scales to read), so a
random-weight 125 M-parameter Llama is exported at each grid (4-bit embeddings, MatMulNBits'
``accuracy_level=4`` as the exporter writes it) and its batch-1 greedy tokens per second timed by
``slimkit.export.Generator`` in interleaved rounds.

The rule the presets follow (``choose``): among a method's variants whose files are on average over the
two models no larger than its current preset's (relative to the current preset's file on each model:
the byte-level Llama's embedding table is a sliver of its weights, MiniLM's and a real LLM's are a third
to a half, so "no larger on either" would rule out 4-bit tables for the sake of the least representative
model) and that decode at least 0.95x as fast as symmetric groups of 128 (the median of the rounds' own
ratios), the one with the smallest loss relative to the current preset's, averaged over the two models.
The markdown names it.

Writes benchmarks/results/int4_presets.{json,md}.

    python benchmarks/int4_presets.py [--quick]
"""

from __future__ import annotations

import logging
import os
import statistics
from typing import Any

import numpy as np
import torch
from _common import bench_main
from llm_generate import CONFIG_125M as CONFIG
from llm_generate import PROMPT, _ppl_file, _time_file

import slimkit as sk
from slimkit.export import Generator

log = logging.getLogger("int4_presets")

P = sk.quant.PRESETS
EMB4 = sk.quant.Embeddings(bits=4)
GRIDS = {"g128 sym": (128, True), "g128 asym": (128, False), "g64 asym": (64, False), "g32 sym": (32, True),
         "g32 asym": (32, False)}


def variants(current: dict[str, Any] | None = None) -> list[tuple[str, str, Any]]:
    """(method, label, passes) for every variant; ``current``: the presets as they ship, by name (the
    benchmark compares against the shipped ones even after they change, through their dicts)."""
    base = {m: sk.quant.resolve_quantize(m) for m in ("int4-weight", "int4-gptq", "int4-awq")}
    gptq_off = sk.quant.GPTQ(act_order=False)
    gptq_on = sk.quant.GPTQ(act_order=True)

    def grid(method: str, g: str, act: bool | None = None, emb4: bool = False) -> Any:
        size, sym = GRIDS[g]
        q = base[method].with_weights(group_size=size, symmetric=sym)
        if act is not None:
            q = q.with_pass(gptq_on if act else gptq_off)
        return q.with_pass(EMB4) if emb4 else q.with_pass(sk.quant.Embeddings(bits=8))

    out: list[tuple[str, str, Any]] = [(m, "current", base[m]) for m in base]
    out += [("int4-weight", f"{g}", grid("int4-weight", g)) for g in GRIDS]
    out += [("int4-gptq", f"{g}", grid("int4-gptq", g, act=False)) for g in ("g128 sym", "g32 asym")]
    out += [("int4-gptq", f"{g}, act-order", grid("int4-gptq", g, act=True)) for g in GRIDS]
    out += [("int4-awq", f"{g}", grid("int4-awq", g)) for g in ("g128 sym", "g128 asym", "g64 asym", "g32 asym")]
    for m, act in (("int4-weight", None), ("int4-gptq", False), ("int4-gptq", True), ("int4-awq", None)):
        for g in ("g128 sym", "g128 asym", "g64 asym", "g32 asym"):
            if act is False and g != "g128 sym":
                continue
            out.append((m, f"{g}{', act-order' if act else ''}, 4-bit embeddings", grid(m, g, act=act, emb4=True)))
    return out


def llama_fidelity(tmp: str, configs: list[tuple[str, str, Any]], quick: bool) -> list[dict[str, Any]]:
    from slimkit.zoo.gpt import lm_data
    from slimkit.zoo.llama import trained_llama

    model = trained_llama()
    train, test = lm_data(128)
    test = test[:32] if quick else test
    calib = [{"input_ids": train[i:i + 16, :-1]} for i in range(0, 16 * (2 if quick else 8), 16)]
    example = train[:1, :16]
    fp32 = sk.export_onnx(model, f"{tmp}/llama/fp32/model.onnx", example, generative=True).path
    base = _ppl_file(fp32, test)
    rows = []
    for i, (method, label, passes) in enumerate(configs):
        q = sk.quantize(model, passes, calib_data=calib)
        path = sk.export_onnx(q, f"{tmp}/llama/{i}/model.onnx", example, generative=True).path
        ppl = _ppl_file(path, test)
        rows.append({"method": method, "config": label, "ppl": ppl, "loss": ppl / base - 1,
                     "size_x": os.path.getsize(path) / os.path.getsize(fp32)})
        log.info("llama %s %s: %s", method, label, rows[-1])
    return [{"method": "FP32", "config": "FP32", "ppl": base, "loss": 0.0, "size_x": 1.0}, *rows]


def minilm_fidelity(tmp: str, configs: list[tuple[str, str, Any]], quick: bool) -> list[dict[str, Any]]:
    from slimkit.data import docstring_sentences
    from slimkit.export.runtime import feeds, session
    from slimkit.zoo.minilm import minilm, tokenize

    model, tok = minilm()
    paragraphs = docstring_sentences(every_paragraph=True)
    n_eval, n_calib = (64, 32) if quick else (512, 128)
    calib = [tokenize(tok, paragraphs[i:i + 16]) for i in range(0, n_calib, 16)]
    evals = [tokenize(tok, paragraphs[-n_eval:][i:i + 64]) for i in range(0, n_eval, 64)]
    ex = tokenize(tok, paragraphs[-8:])

    def embed(path: str) -> np.ndarray:
        s = session(path)
        return np.concatenate([s.run(None, feeds(s, b))[0] for b in evals])

    fp32 = sk.export_onnx(model, f"{tmp}/minilm/fp32.onnx", ex).path
    ref = embed(fp32)
    rows = []
    for i, (method, label, passes) in enumerate(configs):
        q = sk.quantize(model, passes, calib_data=calib)
        path = sk.export_onnx(q, f"{tmp}/minilm/{i}.onnx", ex).path
        e = embed(path)
        cos = float(((e * ref).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))).mean())
        rows.append({"method": method, "config": label, "cosine": cos, "loss": 1 - cos,
                     "size_x": os.path.getsize(path) / os.path.getsize(fp32)})
        log.info("minilm %s %s: %s", method, label, rows[-1])
        os.remove(path)
    return [{"method": "FP32", "config": "FP32", "cosine": 1.0, "loss": 0.0, "size_x": 1.0}, *rows]


def decode_speed(tmp: str, quick: bool) -> dict[str, Any]:
    """Batch-1 greedy tokens per second of a 125 M random Llama's generative file at each grid."""
    import transformers

    new, rounds = (16, 1) if quick else (128, 9)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    example = torch.randint(3, CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    files = {"FP32": sk.export_onnx(model, f"{tmp}/speed/fp32/model.onnx", example, generative=True).path}
    for g, (size, sym) in GRIDS.items():
        q = sk.quantize(model, P["int4-weight"].with_weights(group_size=size, symmetric=sym).with_pass(EMB4))
        files[g] = sk.export_onnx(q, f"{tmp}/speed/{g.replace(' ', '_')}/model.onnx", example, generative=True).path
        del q
        log.info("exported %s", g)
    gens = {k: Generator(v) for k, v in files.items()}
    for gen in gens.values():
        gen.eos = None  # random weights: time every token
    prompt = torch.randint(3, CONFIG["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1)).tolist()
    tps: dict[str, list[float]] = {k: [] for k in files}
    for r in range(rounds):
        for label, gen in gens.items():
            tps[label].append(_time_file(gen, prompt, new)[1])
            log.info("round %d %s: %.1f tok/s", r, label, tps[label][-1])

    def paired(a: str, b: str) -> float:  # the median of the rounds' own ratios: each round times both files
        return statistics.median(x / y for x, y in zip(tps[a], tps[b], strict=True))

    return {"params": sum(p.numel() for p in model.parameters()), "new_tokens": new, "rounds": rounds,
            "rows": [{"grid": k, "tokens_per_s": statistics.median(v), "speed_x": paired(k, "FP32"),
                      "vs_g128_sym": paired(k, "g128 sym"), "rounds_tokens_per_s": v,
                      "size_x": os.path.getsize(files[k]) / os.path.getsize(files["FP32"])} for k, v in tps.items()]}


def _grid_of(label: str) -> str:
    return "g128 sym" if label == "current" else label.split(",")[0]


def choose(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method, the variant the preset should be: see the module docstring."""
    speed = {r["grid"]: r["vs_g128_sym"] for r in res["speed"]["rows"]}
    llama = {(r["method"], r["config"]): r for r in res["llama"]}
    mini = {(r["method"], r["config"]): r for r in res["minilm"]}
    out = {}
    for method in ("int4-weight", "int4-gptq", "int4-awq"):
        cur_l, cur_m = llama[(method, "current")], mini[(method, "current")]
        best, best_score = "current", 1.0
        for (m, label), row in llama.items():
            if m != method or label == "current":
                continue
            other = mini[(m, label)]
            if (row["size_x"] / cur_l["size_x"] + other["size_x"] / cur_m["size_x"]) / 2 > 1.001:
                continue
            if speed[_grid_of(label)] < 0.95:
                continue
            score = (row["loss"] / cur_l["loss"] + other["loss"] / cur_m["loss"]) / 2
            if score < best_score:
                best, best_score = label, score
        out[method] = {"chosen": best, "relative_loss": best_score,
                       "llama_loss": llama[(method, best)]["loss"], "minilm_loss": mini[(method, best)]["loss"]}
    return out


def run(tmp: str, quick: bool) -> dict[str, Any]:
    configs = variants()
    res: dict[str, Any] = {"configs": {f"{m} / {lbl}": q.to_dict() for m, lbl, q in configs}}
    res["speed"] = decode_speed(tmp, quick)
    res["llama"] = llama_fidelity(tmp, configs, quick)
    res["minilm"] = minilm_fidelity(tmp, configs, quick)
    res["choice"] = choose(res)
    return res


def markdown(res: dict[str, Any]) -> str:
    mini = {(r["method"], r["config"]): r for r in res["minilm"]}
    sp = res["speed"]
    m = [f"# int4_presets: the INT4 presets' settings, measured ({res['machine']})", "",
         "Each method's preset as it ships (`current`) and variants of its grid, on the trained zoo Llama "
         "(perplexity per byte of the generative ONNX file, held-out docstrings) and all-MiniLM-L6-v2 (mean "
         "cosine of the ONNX file's embeddings with FP32's, 512 held-out paragraphs); size: the ONNX file over "
         "FP32's. Loss: `ppl / ppl_FP32 - 1` and `1 - cosine`; `vs current`: the two losses over the current "
         "preset's, averaged. Decoding: batch-1 greedy tokens per second of a "
         f"{sp['params'] / 1e6:.0f} M random-weight Llama's generative file at that grid (4-bit embeddings, "
         f"int8 compute), median of {sp['rounds']} interleaved rounds of {sp['new_tokens']} tokens, over FP32's.", "",
         "| method | config | Llama ppl | Llama loss | Llama size | MiniLM cosine | MiniLM loss | MiniLM size "
         "| vs current | decode x FP32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    speed = {r["grid"]: r["speed_x"] for r in sp["rows"]}
    cur = {r["method"]: (r, mini[(r["method"], r["config"])]) for r in res["llama"] if r["config"] == "current"}
    for r in res["llama"]:
        o = mini[(r["method"], r["config"])]
        rel = "-" if r["method"] == "FP32" else \
            f"{(r['loss'] / cur[r['method']][0]['loss'] + o['loss'] / cur[r['method']][1]['loss']) / 2:.2f}"
        dec = "1.00x" if r["method"] == "FP32" else f"{speed[_grid_of(r['config'])]:.2f}x"
        m.append(f"| {r['method']} | {r['config']} | {r['ppl']:.4f} | {r['loss']:.4f} | {r['size_x']:.3f} | "
                 f"{o['cosine']:.4f} | {o['loss']:.4f} | {o['size_x']:.3f} | {rel} | {dec} |")
    m += ["", "Decoding speed by grid (ratios: the median of the rounds' own ratios):", "",
          "| grid | tokens/s | x FP32 | x g128 sym | file size x FP32 |", "|---|---|---|---|---|"]
    m += [f"| {r['grid']} | {r['tokens_per_s']:.1f} | {r['speed_x']:.2f}x | {r['vs_g128_sym']:.2f}x | {r['size_x']:.3f} |"
          for r in sp["rows"]]
    m += ["", "Choice (files on average over the two models no larger than the current preset's, decoding at least "
          "0.95x as fast as symmetric groups of 128, smallest loss relative to the current preset's):", ""]
    for method, c in res["choice"].items():
        m.append(f"- `{method}`: **{c['chosen']}** ({c['relative_loss']:.2f}x the current preset's loss; "
                 f"Llama {c['llama_loss']:.4f}, MiniLM {c['minilm_loss']:.4f})")
    m += ["", f"Total {res['seconds']:.0f} s."]
    return "\n".join(m) + "\n"


if __name__ == "__main__":
    bench_main("int4_presets", run, markdown)
