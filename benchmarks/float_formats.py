"""Benchmark: floating-point and non-uniform formats against FP32 and INT8/INT4, in one run.

- all-MiniLM-L6-v2 (the real sentence transformer) on held-out docstring sentences: embedding cosine
  with the FP32 file, each format's file run in ONNX Runtime (BF16 arithmetic has no CPU kernels
  there: its row is PyTorch's), file size, and CPU latency at batch 1 and 8 (2 threads, interleaved
  rounds) where the file runs here.
- The digits-trained zoo CNNs (ResNet-18- and MobileNetV2-shaped): test accuracy of each file.
- The trained zoo Llama: perplexity per byte on held-out docstrings (PyTorch) and the file's size,
  NF4 against INT4 round-to-nearest and GPTQ at the same group size (64, QLoRA's).

Targets (the float-formats issue): FP16/BF16 cosine >= 0.9999 on MiniLM; FP8 at least as faithful
as INT8 on MiniLM; NF4 perplexity no worse than INT4 RTN at the same size.

    python benchmarks/float_formats.py [--quick]
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from _common import bench_main

import slimkit as sk
from slimkit.data import batches, docstring_sentences, load_digits32
from slimkit.export.runtime import compare_latency, feeds, session
from slimkit.quant import Activations, Embeddings, Quantize, Weights

log = logging.getLogger("float_formats")


def _int4(group: int, gptq: bool = False) -> Quantize:
    passes: list[Any] = [Weights(bits=4, reduce_range=False, group_size=group), Activations(mode="none")]
    if gptq:
        passes.append(sk.quant.GPTQ(act_order=True))
    return Quantize.of([*passes, Embeddings()])


FP8_E5M2 = Quantize.of([Weights(format="fp8-e5m2", reduce_range=False), Activations(format="fp8-e5m2")])

# label, spec; ``None`` is the FP32 model itself
TRANSFORMER: list[tuple[str, Any]] = [
    ("FP32", None), ("fp16", "fp16"), ("bf16 (PyTorch: no BF16 kernels in ONNX Runtime's CPU provider)", "bf16"),
    ("fp16-weights", "fp16-weights"), ("bf16-weights", "bf16-weights"), ("fp8 (E4M3)", "fp8"),
    ("fp8 E5M2", FP8_E5M2), ("int8 (static)", "int8"), ("int8-smoothquant", "int8-smoothquant"),
    ("nf4-weight (groups of 64)", "nf4-weight"), ("int4-weight, groups of 64", _int4(64)),
    ("int4-gptq, groups of 64", _int4(64, gptq=True))]
CNN = ["FP32", "fp16", "bf16", "fp16-weights", "bf16-weights", "fp8", "int8"]
LLM: list[tuple[str, Any]] = [
    ("FP32", None), ("fp16", "fp16"), ("bf16", "bf16"), ("fp8 (E4M3)", "fp8"), ("int8-smoothquant", "int8-smoothquant"),
    ("nf4-weight (groups of 64)", "nf4-weight"), ("int4-weight, groups of 64", _int4(64)),
    ("int4-gptq, groups of 64", _int4(64, gptq=True)), ("int4-weight preset (groups of 128)", "int4-weight")]


def tensor_bytes(path: str) -> int:
    """The bytes of a file's stored tensors (its initializers), without the graph around them: on a small
    model the nodes that unpack 4-bit codes weigh as much as the codes."""
    import onnx

    return sum(len(i.raw_data) or onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(path).graph.initializer)


def _cosine(e: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    c = (e * ref).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}


def minilm(tmp: str, quick: bool) -> dict[str, Any]:
    from slimkit.zoo.minilm import minilm as load
    from slimkit.zoo.minilm import tokenize

    model, tok = load()
    paragraphs = docstring_sentences(every_paragraph=True)
    n_eval, n_calib = (64, 32) if quick else (512, 128)
    calib = [tokenize(tok, paragraphs[i:i + 16]) for i in range(0, n_calib, 16)]
    evals = [tokenize(tok, paragraphs[-n_eval:][i:i + 64]) for i in range(0, n_eval, 64)]
    ex1, ex8 = tokenize(tok, paragraphs[-1:]), tokenize(tok, paragraphs[-8:])

    def embed_file(path: str) -> np.ndarray:
        s = session(path)
        return np.concatenate([s.run(None, feeds(s, b))[0] for b in evals])

    def embed_torch(m: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([m(**b).float() for b in evals]).numpy()

    rows: list[dict[str, Any]] = []
    ref = ref_torch = None
    for i, (label, spec) in enumerate(TRANSFORMER):
        q = model if spec is None else sk.quantize(model, spec, calib_data=calib)
        row: dict[str, Any] = {"config": label}
        if spec == "bf16":  # the file would not run here: PyTorch's result against PyTorch's FP32
            row.update({"path": None, "runs_in": "PyTorch", **_cosine(embed_torch(q), ref_torch)})
            path = sk.export_onnx(q, f"{tmp}/mini{i}.onnx", ex8, check=False).path
            row["size_mb"] = os.path.getsize(path) / 1e6
        else:
            report = sk.export_onnx(q, f"{tmp}/mini{i}.onnx", ex8)
            e = embed_file(report.path)
            if ref is None:
                ref, ref_torch = e, embed_torch(model)
            row.update({"path": report.path, "runs_in": "ONNX Runtime", "size_mb": report.size_bytes / 1e6,
                        "lint": report.lint.issues[:1], **_cosine(e, ref)})
        rows.append(row)
        log.info("MiniLM %s: %s", label, {k: v for k, v in row.items() if k != "path"})
    timed = [r for r in rows if r.get("path")]
    for b, ex in ((1, ex1), (8, ex8)):
        lat = compare_latency([r["path"] for r in timed], ex, threads=2, warmup=3, rounds=2 if quick else 10,
                              seconds=0.3 if quick else 0.5)
        for r, t in zip(timed, lat, strict=True):
            r[f"batch{b}_ms"] = t["median_ms"]
    base = rows[0]
    for r in rows:
        r["size_x"] = r["size_mb"] / base["size_mb"]
        if r.get("path"):
            r["batch1_x"], r["batch8_x"] = r["batch1_ms"] / base["batch1_ms"], r["batch8_ms"] / base["batch8_ms"]
        r.pop("path", None)
    return {"eval_sentences": n_eval, "calib_sentences": n_calib, "rows": rows}


def cnns(tmp: str, quick: bool) -> dict[str, Any]:
    from slimkit.zoo import trained

    d = load_digits32()
    x, y = d.test_x[:128] if quick else d.test_x, d.test_y[:128] if quick else d.test_y
    calib = batches(d.train_x[:256], None, 64)
    out: dict[str, Any] = {"test_images": len(x)}
    for net in ("resnet18", "mobilenet_v2"):
        model = trained(net)
        rows = []
        for name in CNN:
            q = model if name == "FP32" else sk.quantize(model, name, calib_data=calib)
            row: dict[str, Any] = {"config": name}
            if name == "bf16":
                with torch.no_grad():
                    pred = torch.cat([q(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1)
                path = sk.export_onnx(q, f"{tmp}/{net}_{name}.onnx", x[:2], check=False).path
                row.update({"runs_in": "PyTorch", "size_bytes": os.path.getsize(path)})
            else:
                report = sk.export_onnx(q, f"{tmp}/{net}_{name}.onnx", x[:8])
                s = session(report.path)
                pred = torch.from_numpy(np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 256].numpy()})[0]
                                                        for i in range(0, len(x), 256)])).argmax(1)
                row.update({"runs_in": "ONNX Runtime", "size_bytes": report.size_bytes})
            row["accuracy"] = float((pred == y).float().mean())
            rows.append(row)
            log.info("%s %s: %s", net, name, row)
        for r in rows:
            r["size_x"] = r["size_bytes"] / rows[0]["size_bytes"]
        out[net] = rows
    return out


def llama(tmp: str, quick: bool) -> dict[str, Any]:
    from slimkit.zoo.gpt import lm_data, perplexity
    from slimkit.zoo.llama import lm_logits, trained_llama

    model = trained_llama()
    train, test = lm_data(128)
    test = test[:32] if quick else test
    calib = [{"input_ids": train[i:i + 16, :-1]} for i in range(0, 16 * (2 if quick else 8), 16)]
    example = {"input_ids": train[:2, :32], "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    rows = []
    for i, (label, spec) in enumerate(LLM):
        q = model if spec is None else sk.quantize(model, spec, calib_data=calib)
        path = sk.export_onnx(q, f"{tmp}/llama{i}.onnx", example, check=spec != "bf16").path
        rows.append({"config": label, "ppl": perplexity(lm_logits(q), test), "size_bytes": os.path.getsize(path),
                     "tensor_bytes": tensor_bytes(path)})
        log.info("Llama %s: %s", label, rows[-1])
    for r in rows:
        r["size_x"] = r["size_bytes"] / rows[0]["size_bytes"]
        r["tensors_x"] = r["tensor_bytes"] / rows[0]["tensor_bytes"]
        r["ppl_x"] = r["ppl"] / rows[0]["ppl"]
    return {"params": sum(p.numel() for p in model.parameters()), "test_windows": len(test), "rows": rows}


def run(tmp: str, quick: bool) -> dict[str, Any]:
    return {"minilm": minilm(tmp, quick), "cnns": cnns(tmp, quick), "llama": llama(tmp, quick)}


def markdown(res: dict[str, Any]) -> str:
    mi = res["minilm"]
    m = [f"# float_formats: FP16, BF16, FP8, NF4 against FP32, INT8 and INT4 ({res['machine']})", "",
         f"onnxruntime {res['onnxruntime']}, torch {res['torch']}.", "",
         "## all-MiniLM-L6-v2", "",
         f"Cosine of each file's sentence embeddings with the FP32 file's on {mi['eval_sentences']} held-out "
         f"docstring paragraphs (calibration: {mi['calib_sentences']} others); latency in ONNX Runtime's CPU "
         "provider, 2 threads, medians of interleaved rounds, as a ratio to FP32 (below 1 is faster). FP8 and "
         "NF4 have no CPU kernels: ONNX Runtime runs those layers in float (their latency says what that costs; "
         "they are formats for GPUs and for the file's size).", "",
         "| config | runs in | cosine mean | cosine min | file MB | x FP32 size | b1 x FP32 | b8 x FP32 |",
         "|---|---|---|---|---|---|---|---|"]
    for r in mi["rows"]:
        lat = f"{r['batch1_x']:.2f}x | {r['batch8_x']:.2f}x" if "batch1_x" in r else "- | -"
        m.append(f"| {r['config']} | {r['runs_in']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | "
                 f"{r['size_mb']:.1f} | {r['size_x']:.3f} | {lat} |")
    cn = res["cnns"]
    m += ["", "## The digits-trained zoo CNNs", "",
          f"Test accuracy on {cn['test_images']} held-out digits (the file in ONNX Runtime; BF16 in PyTorch).", "",
          "| config | resnet18 accuracy | x FP32 size | mobilenet_v2 accuracy | x FP32 size |", "|---|---|---|---|---|"]
    for a, b in zip(cn["resnet18"], cn["mobilenet_v2"], strict=True):
        m.append(f"| {a['config']} | {a['accuracy']:.4f} | {a['size_x']:.3f} | {b['accuracy']:.4f} | {b['size_x']:.3f} |")
    ll = res["llama"]
    m += ["", "## The trained zoo Llama", "",
          f"`trained_llama()`, {ll['params'] / 1e6:.2f} M parameters: perplexity per byte on {ll['test_windows']} "
          "held-out windows of 128 bytes (PyTorch), and the exported file's size: the whole file, and its stored "
          "tensors alone (at 1.25 M parameters the nodes that unpack 4-bit codes are a tenth of the file).", "",
          "| config | perplexity | x FP32 | file x FP32 | tensors x FP32 |", "|---|---|---|---|---|"]
    for r in ll["rows"]:
        m.append(f"| {r['config']} | {r['ppl']:.4f} | {r['ppl_x']:.3f}x | {r['size_x']:.3f} | {r['tensors_x']:.3f} |")
    return "\n".join(m) + "\n"


def main() -> None:
    bench_main("float_formats", run, markdown)


if __name__ == "__main__":
    main()
