"""Benchmark: generative exports (key/value cache), FP32 against INT8 and INT4: perplexity on a
trained decoder, decoding speed on a larger random one.

Fidelity: ``slimkit.zoo.llama.trained_llama()`` (a 1.25 M-parameter ``LlamaForCausalLM`` over bytes,
trained on the standard library's docstrings) quantized with ``int8-dynamic``, ``int8-smoothquant``
and the INT4 presets with 4-bit embeddings, exported with ``generative=True``; perplexity per byte
on held-out docstrings in PyTorch and in the file, beside ONNX Runtime's ``MatMulNBitsQuantizer``.

Speed: a random-weight ``LlamaForCausalLM`` (width 1536, 18 layers, 12 query and 4 key/value heads, gated
MLP of 4096, vocabulary 32000: 0.55 B parameters, 2.2 GB in FP32, so the FP32 file keeps its tensors in
``model.onnx.data`` beside it; speed only, its outputs mean nothing) is exported
with ``sk.export_onnx(..., generative=True)`` as FP32, slimkit ``int8-dynamic``, ``int8-smoothquant``
and 4-bit groups of 128 with 4-bit embeddings (round to nearest: GPTQ and AWQ write the same
operators, so they decode at the same speed), the 4-bit file both with MatMulNBits'
``accuracy_level=4`` (int8 activations, the exporter's default for decoding) and with float
compute. The peer is ONNX Runtime's own ``MatMulNBitsQuantizer`` (groups of 128, symmetric) on the
FP32 file, at its default compute and at ``accuracy_level=4``; PyTorch eager FP32 ``generate``
(with its cache) runs beside them. Each is timed by ``slimkit.export.Generator`` (ONNX Runtime, 2
threads) in interleaved rounds: time to the first token for a 128-token prompt, then the tokens per
second of the next ``NEW`` greedy tokens, at batch 1 and batch 4 (the four sequences' tokens together). The table gives medians over the
rounds and the ratios to the FP32 file's tokens per second.

Writes benchmarks/results/llm_generate.{json,md}.

    python benchmarks/llm_generate.py [--quick]
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import bench_main

import slimkit as sk
from slimkit.export import Generator

log = logging.getLogger("llm_generate")

# the 125 M Llama this benchmark decoded before (int4_presets.py times its grids on it)
CONFIG_125M = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
               "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 1024}
CONFIG = {"vocab_size": 32000, "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 18,
          "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 1024}
PROMPT = 128
NEW = 128
INT4 = [{"weights": {"bits": 4, "group_size": 128}}, {"activations": {"mode": "none"}}, {"embeddings": {"bits": 4}}]


def file_bytes(path: str) -> int:
    """A file's bytes with its external tensors (``model.onnx.data``), where it has them."""
    data = Path(path + ".data")
    return os.path.getsize(path) + (data.stat().st_size if data.exists() else 0)


def ort_nbits(fp32: str, out: str, accuracy_level: int | None) -> str:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(fp32), block_size=128, is_symmetric=True, op_types_to_quantize=("MatMul",),
                             accuracy_level=accuracy_level)
    q.process()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(out, use_external_data_format=False)
    shutil.copy(Path(fp32).parent / "genai_config.json", Path(out).parent / "genai_config.json")
    return out


def _time_torch(model: torch.nn.Module, prompts: torch.Tensor, new: int) -> tuple[float, float]:
    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - t
    first = gen(1)
    total = gen(new)
    return first, (new - 1) / max(total - first, 1e-9)


def _time_file(g: Generator, prompts: list[list[int]], new: int) -> tuple[float, float]:
    outs = g.generate_batch(prompts, max_new_tokens=new)
    o = outs[0]
    return o.seconds_to_first_token, (new - 1) / max(o.seconds - o.seconds_to_first_token, 1e-9)


def _ppl_file(path: str, windows: torch.Tensor, batch: int = 16) -> float:
    """Perplexity per byte of a generative file on ``windows [n, L + 1]``: each batch of windows is one
    prefill (a past of length 0), its logits at every position scored."""
    import math

    import numpy as np

    g = Generator(path)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].numpy()
        logits, _ = g.step(w[:, :-1], np.ones_like(w[:, :-1]), g.empty_past(len(w)))
        z = torch.from_numpy(logits).double()
        total += float(torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), torch.from_numpy(w[:, 1:]).reshape(-1),
                                                         reduction="sum"))
        count += w[:, 1:].size
    return math.exp(total / count)


def fidelity(tmp: str, quick: bool) -> dict[str, Any]:
    """The trained zoo Llama: perplexity per byte on held-out docstrings, PyTorch and the exported file."""
    from slimkit.zoo.gpt import lm_data, perplexity
    from slimkit.zoo.llama import lm_logits, trained_llama

    model = trained_llama()
    train, test = lm_data(128)
    test = test[:32] if quick else test
    calib = [{"input_ids": train[i:i + 16, :-1]} for i in range(0, 16 * (2 if quick else 8), 16)]
    example = train[:1, :16]
    def four(name: str) -> Any:
        return sk.quant.PRESETS[name].with_pass(sk.quant.Embeddings(bits=4))

    configs: list[tuple[str, Any]] = [
        ("FP32", None), ("slimkit int8-dynamic", "int8-dynamic"), ("slimkit int8-smoothquant", "int8-smoothquant"),
        ("slimkit int4-weight + 4-bit embeddings", four("int4-weight")),
        ("slimkit int4-gptq + 4-bit embeddings", four("int4-gptq")),
        ("slimkit int4-awq + 4-bit embeddings", four("int4-awq"))]
    rows: list[dict[str, Any]] = []
    fp32_file = ""
    for i, (label, spec) in enumerate(configs):
        t = time.time()
        q = model if spec is None else sk.quantize(model, spec, calib_data=calib)
        took = time.time() - t
        path = sk.export_onnx(q, f"{tmp}/fid{i}/model.onnx", example, generative=True).path
        fp32_file = fp32_file or path
        rows.append({"config": label, "ppl_torch": perplexity(lm_logits(q), test), "ppl_file": _ppl_file(path, test),
                     "size_x": os.path.getsize(path) / os.path.getsize(fp32_file), "quantize_seconds": took})
        log.info("%s: %s", label, rows[-1])
    peer = ort_nbits(fp32_file, f"{tmp}/fidort/model.onnx", 4)
    rows.append({"config": "ORT MatMulNBitsQuantizer (groups of 128, symmetric)", "ppl_file": _ppl_file(peer, test),
                 "size_x": os.path.getsize(peer) / os.path.getsize(fp32_file), "peer": True})
    return {"params": sum(p.numel() for p in model.parameters()), "test_windows": len(test),
            "calib_windows": 16 * len(calib), "rows": rows}


def run(tmp: str, quick: bool) -> dict[str, Any]:
    return {"trained": fidelity(tmp, quick), **speed(tmp, quick)}


def speed(tmp: str, quick: bool) -> dict[str, Any]:
    import transformers

    new = 16 if quick else NEW
    rounds = 1 if quick else 3
    cfg = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    example = torch.randint(3, CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    calib = [{"input_ids": torch.randint(3, CONFIG["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(i))}
             for i in range(2)]
    files: dict[str, str] = {}
    seconds: dict[str, float] = {}

    def export(label: str, m: torch.nn.Module, **opts: Any) -> None:
        t = time.time()
        files[label] = sk.export_onnx(m, f"{tmp}/{len(files)}/model.onnx", example, generative=True, **opts).path
        seconds[label] = time.time() - t
        log.info("exported %s in %.0f s", label, seconds[label])

    export("FP32", model)
    export("slimkit int8-dynamic", sk.quantize(model, "int8-dynamic"))
    if not quick:
        export("slimkit int8-smoothquant", sk.quantize(model, "int8-smoothquant", calib_data=calib))
    int4 = sk.quantize(model, INT4)
    export("slimkit int4 (groups of 128, 4-bit embeddings), int8 compute", int4)
    export("slimkit int4, float compute", int4, accuracy_level=None)
    files["ORT MatMulNBitsQuantizer, default compute"] = ort_nbits(files["FP32"], f"{tmp}/ort0/model.onnx", None)
    files["ORT MatMulNBitsQuantizer, accuracy_level=4"] = ort_nbits(files["FP32"], f"{tmp}/ort4/model.onnx", 4)
    gens = {k: Generator(v) for k, v in files.items()}
    for g in gens.values():
        g.eos = None  # random weights: time every token
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, CONFIG["vocab_size"], (4, PROMPT), generator=gen)
    times: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "tps1": [], "tps4": []}
                                               for k in ["PyTorch eager FP32", *files]}
    for r in range(rounds):
        for label in times:
            if label == "PyTorch eager FP32":
                ttft, tps1 = _time_torch(model, prompts[:1], new)
                _, steps = _time_torch(model, prompts, new)
                tps4 = len(prompts) * steps  # tokens of all four sequences
            else:
                ttft, tps1 = _time_file(gens[label], [prompts[0].tolist()], new)
                _, steps = _time_file(gens[label], prompts.tolist(), new)
                tps4 = len(prompts) * steps
            for k, v in (("ttft", ttft), ("tps1", tps1), ("tps4", tps4)):
                times[label][k].append(v)
            log.info("round %d %s: first token %.0f ms, %.1f tok/s (batch 1), %.1f (batch 4)", r, label,
                     1e3 * ttft, tps1, tps4)
    fp32_size = file_bytes(files["FP32"])
    rows = []
    for label, t in times.items():
        row: dict[str, Any] = {"config": label, "ttft_ms": 1e3 * statistics.median(t["ttft"]),
                               "tokens_per_s_b1": statistics.median(t["tps1"]),
                               "tokens_per_s_b4": statistics.median(t["tps4"]), "peer": label.startswith("ORT")}
        if label in files:
            row["size_mb"] = file_bytes(files[label]) / 1e6
            row["size_x"] = file_bytes(files[label]) / fp32_size
        if label in seconds:
            row["export_seconds"] = seconds[label]
        rows.append(row)
    base = next(r for r in rows if r["config"] == "FP32")
    for row in rows:
        row["speed_x_b1"] = row["tokens_per_s_b1"] / base["tokens_per_s_b1"]
        row["speed_x_b4"] = row["tokens_per_s_b4"] / base["tokens_per_s_b4"]
    return {"params": params, "config": CONFIG, "prompt": PROMPT, "new_tokens": new, "rounds": rounds, "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    tr = res["trained"]
    fp = tr["rows"][0]
    m = [f"# llm_generate: generative exports, fidelity and decoding speed ({res['machine']})", "",
         "## Fidelity: the trained zoo Llama", "",
         f"`slimkit.zoo.llama.trained_llama()`: `LlamaForCausalLM`, {tr['params'] / 1e6:.2f} M parameters (RMSNorm, "
         "rotary positions, 4 query / 2 key-value heads, gated MLP, bytes as tokens) trained on standard-library "
         f"docstrings. Perplexity per byte on {tr['test_windows']} held-out windows of 128 bytes, in PyTorch and in the "
         "generative file (ONNX Runtime, each window one prefill); calibration on "
         f"{tr['calib_windows']} training windows. Lower is better.", "",
         "| config | ppl PyTorch | ppl file | file vs FP32 ppl | file size vs FP32 |", "|---|---|---|---|---|"]
    for r in tr["rows"]:
        torch_ppl = f"{r['ppl_torch']:.4f}" if "ppl_torch" in r else "-"
        m.append(f"| {r['config']} | {torch_ppl} | {r['ppl_file']:.4f} | {r['ppl_file'] / fp['ppl_file']:.3f}x "
                 f"| {r['size_x']:.3f} |")
    m += ["", f"## Speed: a {res['params'] / 1e9:.2f} B random-weight Llama", "",
         f"onnxruntime {res['onnxruntime']}, torch {res['torch']}. Random-weight `LlamaForCausalLM`, "
         f"{res['params'] / 1e9:.2f} B parameters (width {res['config']['hidden_size']}, "
         f"{res['config']['num_hidden_layers']} layers, {res['config']['num_attention_heads']} query / "
         f"{res['config']['num_key_value_heads']} key-value heads, vocabulary {res['config']['vocab_size']}): speed "
         "only. Each file exported with `sk.export_onnx(..., generative=True)` (the peer: ONNX Runtime's "
         "`MatMulNBitsQuantizer` on the FP32 file) and run by `slimkit.export.Generator`, 2 threads; a "
         f"{res['prompt']}-token prompt, then {res['new_tokens']} greedy tokens through the key/value cache; medians "
         f"of {res['rounds']} interleaved rounds. `x FP32`: tokens per second over the FP32 file's.", "",
         "| config | file MB | x FP32 size | first token ms (b1) | tokens/s b1 | x FP32 | tokens/s b4 | x FP32 |",
         "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        size = f"{r['size_mb']:.0f} | {r['size_x']:.3f}" if "size_mb" in r else "- | -"
        m.append(f"| {r['config']} | {size} | {r['ttft_ms']:.0f} | {r['tokens_per_s_b1']:.1f} | {r['speed_x_b1']:.2f}x "
                 f"| {r['tokens_per_s_b4']:.1f} | {r['speed_x_b4']:.2f}x |")
    return "\n".join(m) + "\n"


def main() -> None:
    bench_main("llm_generate", run, markdown)


if __name__ == "__main__":
    main()
