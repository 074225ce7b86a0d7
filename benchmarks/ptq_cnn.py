"""Benchmark: INT8 post-training quantization of CNNs in ONNX Runtime, against FP32 and the peers.

Speed: the ResNet-18-shaped net at 224x224 (random weights; speed does not depend on them), batch 1
and 8, 2 threads. Quality: the digits-trained ResNet- and MobileNetV2-shaped nets, accuracy and
top-1 agreement with FP32, every model run in ONNX Runtime. Peers in the same run: ONNX Runtime's
``quantize_static`` (per-channel QDQ; min-max and entropy) and torch.ao's FX PTQ where it
runs. Writes benchmarks/results/ptq_cnn.json and .md.

    python benchmarks/ptq_cnn.py [--quick] [--name ptq_cnn_vnni]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _common import machine

import slimkit as sk
from slimkit.data import batches, load_digits32
from slimkit.export.peers import ort_quantize_static
from slimkit.export.runtime import compare_latency, session
from slimkit.zoo import resnet18, trained

RESULTS = Path(__file__).parent / "results"


def ort_predict(path, x):
    s = session(path)
    n = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {n: x[i:i + 128].numpy()})[0] for i in range(0, len(x), 128)])


def torch_ao_accuracy(model, calib, x, y):
    """torch.ao FX static PTQ (x86 backend) run in PyTorch: the peer most PyTorch users reach for."""
    try:
        import copy

        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        m = copy.deepcopy(model).eval()
        prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (calib[0],))
        with torch.no_grad():
            for b in calib:
                prepared(b)
        qm = convert_fx(prepared)
        with torch.no_grad():
            pred = torch.cat([qm(x[i:i + 128]) for i in range(0, len(x), 128)]).argmax(1)
        return float(100 * (pred == y).float().mean()), pred.numpy()
    except Exception as e:  # torch.ao is deprecated upstream; report, do not crash
        return f"failed: {type(e).__name__}: {str(e)[:80]}", None


def quality(name, d, tmp):
    model = trained(name)
    calib = batches(d.train_x[:256], None, 32)
    fp32 = sk.export_onnx(model, f"{tmp}/{name}_fp32.onnx", d.test_x[:32]).path
    ref_logits = ort_predict(fp32, d.test_x)
    ref = ref_logits.argmax(1)
    rows = {"FP32": fp32}
    t = time.time()
    q = sk.quantize(model, "int8", calib_data=calib)
    qtime = time.time() - t
    rows["slimkit int8"] = sk.export_onnx(q, f"{tmp}/{name}_sk.onnx", d.test_x[:32]).path
    qe = sk.quantize(model, {"calibrator": "entropy"}, calib_data=calib)
    rows["slimkit int8, entropy calibrator"] = sk.export_onnx(qe, f"{tmp}/{name}_ske.onnx", d.test_x[:32]).path
    for method in ("minmax", "entropy"):
        rows[f"ORT quantize_static ({method})"] = ort_quantize_static(fp32, f"{tmp}/{name}_ort_{method}.onnx", calib, method)
    rows["ORT quantize_static (minmax, reduce_range)"] = ort_quantize_static(
        fp32, f"{tmp}/{name}_ort_rr.onnx", calib, "minmax", reduce_range=True)
    out = []
    for label, path in rows.items():
        logits = ort_predict(path, d.test_x)
        pred = logits.argmax(1)
        err = float(np.sum((logits - ref_logits) ** 2) / np.sum(ref_logits**2))
        out.append({"model": label, "accuracy": float(100 * np.mean(pred == d.test_y.numpy())),
                    "top1_agreement": float(100 * np.mean(pred == ref)), "size_kb": os.path.getsize(path) / 1e3,
                    "sqnr_db": None if err == 0 else float(-10 * np.log10(err))})
    acc, pred = torch_ao_accuracy(model, calib, d.test_x, d.test_y)
    out.append({"model": "torch.ao FX PTQ (x86, in PyTorch)", "accuracy": acc,
                "top1_agreement": float(100 * np.mean(pred == ref)) if pred is not None else None, "size_kb": None,
                "sqnr_db": None})
    return {"net": name, "rows": out, "slimkit_quantize_seconds": qtime}


def speed(tmp, quick):
    torch.manual_seed(0)
    model = resnet18(width=64).eval()  # the real ResNet-18 shape, 3x224x224
    calib = [torch.randn(4, 3, 224, 224) for _ in range(2 if quick else 8)]
    ex = torch.randn(1, 3, 224, 224)
    fp32 = sk.export_onnx(model, f"{tmp}/r18_fp32.onnx", ex).path
    q = sk.quantize(model, "int8", calib_data=calib)
    ours = sk.export_onnx(q, f"{tmp}/r18_sk.onnx", ex)
    rows = {"FP32": fp32, "slimkit int8": ours.path,
            "ORT quantize_static (minmax)": ort_quantize_static(fp32, f"{tmp}/r18_ort.onnx", calib, "minmax")}
    out = [{"model": label, "size_mb": os.path.getsize(path) / 1e6} for label, path in rows.items()]
    for b in (1, 8):  # interleaved rounds: the machine's drift hits every file alike
        lat = compare_latency(list(rows.values()), torch.randn(b, 3, 224, 224), threads=2, warmup=3,
                              rounds=2 if quick else 5, seconds=0.5 if quick else 2.0)
        for entry, t in zip(out, lat, strict=True):
            entry[f"batch{b}_median_ms"], entry[f"batch{b}_min_ms"] = t["median_ms"], t["min_ms"]
    base = out[0]
    for e in out:
        e["size_x"] = e["size_mb"] / base["size_mb"]
        for b in (1, 8):
            e[f"batch{b}_x"] = e[f"batch{b}_median_ms"] / base[f"batch{b}_median_ms"]
    return {"net": "resnet18 (width 64, 3x224x224, random weights)", "rows": out, "lint": ours.lint.to_dict()}


def markdown(res):
    m = [f"# ptq_cnn: INT8 PTQ of CNNs in ONNX Runtime ({res['machine']})", "",
         f"onnxruntime {res['onnxruntime']}, torch {res['torch']}, 2 threads. Ratios are against FP32 in the same run; "
         "latency is the median over 5 interleaved rounds of 2 s per file.", "",
         f"## Speed and size: {res['speed']['net']}", "",
         "| model | size MB | size vs FP32 | batch 1 ms | batch 1 vs FP32 | batch 8 ms | batch 8 vs FP32 |", "|---|---|---|---|---|---|---|"]
    for r in res["speed"]["rows"]:
        m.append(f"| {r['model']} | {r['size_mb']:.2f} | {r['size_x']:.3f}x | {r['batch1_median_ms']:.2f} | {r['batch1_x']:.2f}x | "
                 f"{r['batch8_median_ms']:.2f} | {r['batch8_x']:.2f}x |")
    m += ["", f"slimkit lint: {res['speed']['lint']}", ""]
    for qres in res["quality"]:
        m += [f"## Accuracy: {qres['net']} trained on digits (360 test images)", "",
              "SQNR: the logits of the 360 test images against FP32's, both in ONNX Runtime (higher is closer).", "",
              "| model | accuracy % | top-1 agreement with FP32 % | logits SQNR dB | size kB |", "|---|---|---|---|---|"]
        for r in qres["rows"]:
            acc = r["accuracy"] if isinstance(r["accuracy"], str) else f"{r['accuracy']:.2f}"
            agree = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.1f}"
            size = "-" if r["size_kb"] is None else f"{r['size_kb']:.0f}"
            sqnr = "-" if r.get("sqnr_db") is None else f"{r['sqnr_db']:.1f}"
            m.append(f"| {r['model']} | {acc} | {agree} | {sqnr} | {size} |")
        m.append("")
    return "\n".join(m) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default="ptq_cnn", help="results file stem (a run on another machine keeps both)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    d = load_digits32()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"machine": machine(), "onnxruntime": ort.__version__, "torch": torch.__version__,
               "speed": speed(tmp, args.quick), "quality": [quality(n, d, tmp) for n in ("resnet18", "mobilenet_v2")]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
