"""Benchmark: 4- and 3-bit weight-only quantization of a small causal language model, by perplexity.

The model is ``slimkit.zoo.gpt.trained_gpt()``: a byte-level GPT-2-style model (4 blocks, width
128, tied input and output embeddings) trained once (about ten minutes, then cached) on the standard library's
docstrings, the last 10% of whose paragraphs are held out as test text. Calibration uses 256
training windows of 128 bytes. Every Linear layer is quantized in groups along its input, by
round-to-nearest, GPTQ (with and without act-order) and AWQ, at 4 and 3 bits, groups of 32 and
128, symmetric, with the perplexity of the held-out text for each. 4-bit models are exported
(MatMulNBits) and their perplexity and file size measured in ONNX Runtime, beside ONNX Runtime's
own 4-bit quantizer (MatMulNBitsQuantizer, round-to-nearest) on the FP32 file. ONNX Runtime's
MatMulNBits has no 3-bit CPU kernel, so 3-bit perplexities are measured in PyTorch (the quantized
model computes with the dequantized weights, as MatMulNBits does).

Writes benchmarks/results/causal_lm.{json,md}.

    python benchmarks/causal_lm.py [--quick]
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from _common import bench_main

import slimkit as sk
from slimkit.export import OrtModule
from slimkit.zoo.gpt import lm_data, perplexity, trained_gpt

log = logging.getLogger("causal_lm")

METHODS: tuple[tuple[str, list[Any]], ...] = (
    ("round-to-nearest", []),
    ("GPTQ", [sk.quant.GPTQ()]),
    ("GPTQ act-order", [sk.quant.GPTQ(act_order=True)]),
    ("AWQ", [sk.quant.AWQ()]))


def ort_nbits(fp32: str, out: str, block: int, symmetric: bool) -> str:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(fp32), block_size=block, is_symmetric=symmetric, op_types_to_quantize=("MatMul",))
    q.process()
    q.model.save_model_to_file(out, use_external_data_format=False)
    return out


def run(tmp: str, quick: bool) -> dict[str, Any]:
    t = time.time()
    model = trained_gpt()
    train_s = time.time() - t
    train, test = lm_data(model.context)
    if quick:
        test = test[:64]
    calib = [train[i:i + 16, :-1] for i in range(0, 64 if quick else 256, 16)]
    example = test[:2, :-1]
    fp32 = sk.export_onnx(model, f"{tmp}/fp32.onnx", example).path
    fp32_size = os.path.getsize(fp32)
    rows: list[dict[str, Any]] = [{"config": "FP32", "bits": 32, "group": None, "ppl": perplexity(model, test),
                                   "ppl_ort": perplexity(OrtModule(fp32), test), "size_x": 1.0}]
    for bits in (4, 3):
        for group in (32, 128):
            for label, extra in METHODS[:2] if quick else METHODS:
                cfg = [sk.quant.Weights(bits=bits, group_size=group, reduce_range=False),
                       sk.quant.Activations(mode="none"), *extra]
                t = time.time()
                q = sk.quantize(model, cfg, calib_data=calib)
                row: dict[str, Any] = {"config": label, "bits": bits, "group": group, "seconds": time.time() - t,
                                       "ppl": perplexity(q, test)}
                if bits == 4:
                    path = sk.export_onnx(q, f"{tmp}/q.onnx", example).path
                    row["ppl_ort"] = perplexity(OrtModule(path), test)
                    row["size_x"] = os.path.getsize(path) / fp32_size
                log.info("%s", row)
                rows.append(row)
    for group, sym in ((32, True), (128, True)):
        path = ort_nbits(fp32, f"{tmp}/ort_{group}.onnx", group, sym)
        rows.append({"config": "ORT MatMulNBitsQuantizer (round-to-nearest)", "bits": 4, "group": group, "peer": True,
                     "ppl_ort": perplexity(OrtModule(path), test), "size_x": os.path.getsize(path) / fp32_size})
        log.info("%s", rows[-1])
    params = sum(p.numel() for p in model.parameters())
    return {"rows": rows, "params": params, "fp32_mb": fp32_size / 1e6, "test_windows": len(test),
            "train_windows": len(train), "calib_windows": 16 * len(calib), "context": model.context,
            "train_seconds_or_cache": train_s}


def markdown(res: dict[str, Any]) -> str:
    r0 = res["rows"][0]
    m = [f"# causal_lm: weight-only 4- and 3-bit quantization of a small GPT ({res['machine']})", "",
         f"onnxruntime {res['onnxruntime']}, torch {res['torch']}. Byte-level GPT-2-style model (`slimkit.zoo.gpt`, "
         f"{res['params']:,} parameters, tied embeddings, FP32 file {res['fp32_mb']:.2f} MB) trained on standard-library "
         f"docstrings; perplexity per byte on {res['test_windows']} held-out windows of {res['context']} bytes (paragraphs "
         f"never seen in training); calibration on {res['calib_windows']} training windows. Every Linear layer, the tied "
         "output head included, in symmetric groups along its input. `ppl (ORT)`: the exported file in ONNX Runtime "
         "(MatMulNBits); MatMulNBits has no 3-bit CPU kernel, so 3-bit perplexity is PyTorch's. "
         "Lower is better.", "",
         f"FP32: perplexity {r0['ppl']:.4f} (PyTorch), {r0['ppl_ort']:.4f} (ONNX Runtime).", "",
         "| bits | group | method | ppl (PyTorch) | vs FP32 | ppl (ORT) | file vs FP32 | quantize s |",
         "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"][1:]:
        ppl = f"{r['ppl']:.4f}" if "ppl" in r else "-"
        rel = f"{r['ppl'] / r0['ppl']:.3f}x" if "ppl" in r else f"{r['ppl_ort'] / r0['ppl_ort']:.3f}x"
        ort_ppl = f"{r['ppl_ort']:.4f}" if "ppl_ort" in r else "-"
        size = f"{r['size_x']:.3f}" if "size_x" in r else "-"
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        m.append(f"| {r['bits']} | {r['group']} | {r['config']} | {ppl} | {rel} | {ort_ppl} | {size} | {secs} |")
    return "\n".join(m) + "\n"


def main() -> None:
    bench_main("causal_lm", run, markdown)


if __name__ == "__main__":
    main()
