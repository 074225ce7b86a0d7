"""Benchmark: slimkit's files in the runtimes users deploy with, ONNX Runtime, OpenVINO, Apache
TVM and LiteRT (TFLite), each file against the FP32 file in the same runtime, in one run.

Models: the digits-trained zoo ResNet-18 and MobileNetV2 (accuracy on the digits test set), the
ImageNet-trained EfficientNet-Lite1 (a real depthwise CNN: top-1 agreement with FP32 PyTorch on
photo crops) and all-MiniLM-L6-v2 (embedding cosine with FP32 PyTorch on held-out docstring
paragraphs, 64 tokens). Configs: FP32, static INT8 (``int8``), 50% structured pruning (CNNs, no
fine-tuning: a latency row), and for MiniLM ``int8-dynamic`` and ``int4-weight``. Each file is
exported with ``export_onnx(target=runtime)``: for TVM at static shapes (one file per batch
size) with 4-bit layers as plain ONNX; parity with the PyTorch model is the relative L2 of the
runtime's outputs from PyTorch's. Latency: 2 threads, batch 1 and 8, median of interleaved rounds
within each runtime, as a ratio to that runtime's FP32 file. TVM compiles with its default LLVM
schedules (no tuning). OpenVINO runs float layers in FP32 (its BF16 default on CPUs with BF16 units
would be another format). LiteRT runs ``.tflite`` files from ``export_onnx(target="tflite")``
(slimkit's own converter; CNNs only) with its default XNNPACK delegate.

    python benchmarks/runtimes.py [--quick] [--only litert]

``--only litert`` re-runs the LiteRT rows alone and merges them into the committed results.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import RESULTS, bench_main, machine, write_results
from torch import nn

import slimkit as sk
from slimkit.data import docstring_sentences, load_digits32
from slimkit.data.photos import photo_crops
from slimkit.export.lint import lint
from slimkit.export.runtimes import available, compare_runtime_latency, integer_kernels, open_file
from slimkit.zoo import trained
from slimkit.zoo.efficientnet_lite import efficientnet_lite, preprocess

log = logging.getLogger("runtimes")
RUNTIMES = [r for r in ("onnxruntime", "openvino", "tvm", "litert") if available(r)]


def _np(batch: Any) -> dict[str, np.ndarray] | np.ndarray:
    return {k: v.numpy() for k, v in batch.items()} if isinstance(batch, dict) else batch.numpy()


def _slice(batch: Any, i: int, j: int) -> Any:
    return {k: v[i:j] for k, v in batch.items()} if isinstance(batch, dict) else batch[i:j]


def _feeds(runner: Any, batch: Any) -> dict[str, np.ndarray]:
    b = _np(batch)
    return {n: b[n] for n in runner.input_names} if isinstance(b, dict) else {runner.input_names[0]: b}


def _run_all(runner: Any, data: Any, chunk: int) -> np.ndarray:
    n = len(next(iter(data.values()))) if isinstance(data, dict) else len(data)
    return np.concatenate([runner.run(_feeds(runner, _slice(data, i, i + chunk)))[0] for i in range(0, n, chunk)])


def suite(tmp: str, name: str, model: nn.Module, configs: list[tuple[str, Callable[[], nn.Module]]], data: Any,
          score: Callable[[np.ndarray], dict[str, float]], ex1: Any, ex8: Any, rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    built = [(label, make()) for label, make in configs]
    for rt in RUNTIMES:
        paths: dict[int, list[str]] = {1: [], 8: []}
        rt_rows = []
        for ci, (label, m) in enumerate(built):
            row: dict[str, Any] = {"model": name, "config": label, "runtime": rt}
            try:
                files = {}
                for b, ex in ((8, ex8), (1, ex1)):  # TVM: one static file per batch size; the others take both
                    if rt != "tvm" and b == 1:
                        files[1] = files[8]
                        continue
                    # the batch-1 file is the batch-8 file's graph at another shape: its parity is judged at batch 8
                    suffix, target = (".tflite", "tflite") if rt == "litert" else (".onnx", rt)
                    files[b] = sk.export_onnx(m, f"{tmp}/{name}_{ci}_{rt}_{b}{suffix}", ex, target=target, check=b == 8)
                rep = files[8]
                runner = open_file(rep.path, rt)
                out = _run_all(runner, data, 8)
                with torch.no_grad():
                    want = torch.cat([sk_out(m, _slice(data, i, i + 64)) for i in range(0, len(out), 64)]).numpy()
                row.update({"loads": True, "parity_rel_l2": float(np.linalg.norm(out - want) / np.linalg.norm(want)),
                            "size_mb": os.path.getsize(rep.path) / 1e6, **score(out),
                            "lint": (rep.lint if rt == "litert" else lint(rep.path, rt)).issues[:2]})
                if rt in ("openvino", "litert"):
                    row[f"{rt}_kernels"] = integer_kernels(rep.path, rt)
                for b in (1, 8):
                    paths[b].append(files[b].path)
                row["_ok"] = True
            except Exception as e:  # a file a runtime cannot take is a row of the table, not the end of the run
                row.update({"loads": False, "error": str(e).splitlines()[0][:240]})
                log.warning("%s %s in %s: %s", name, label, rt, row["error"])
            rt_rows.append(row)
            log.info("%s", {k: v for k, v in row.items() if k != "_ok"})
        ok = [r for r in rt_rows if r.pop("_ok", False)]
        for b, ex in ((1, ex1), (8, ex8)):
            if not ok:
                break
            lat = compare_runtime_latency(paths[b], [_feeds(open_file(p, rt), ex) for p in paths[b]] if rt == "tvm"
                                          else _feeds(open_file(paths[b][0], rt), ex), rt, rounds=rounds, seconds=0.4,
                                          warmup=5)
            base = lat[0]["median_ms"] if ok[0]["config"] == "FP32" else float("nan")
            for r, t in zip(ok, lat, strict=True):
                r[f"b{b}_ms"], r[f"b{b}_x"] = t["median_ms"], t["median_ms"] / base
        rows += rt_rows
    return rows


def sk_out(m: nn.Module, batch: Any) -> torch.Tensor:
    out = m(**batch) if isinstance(batch, dict) else m(batch)
    return out.float()


def run(tmp: str, quick: bool) -> dict[str, Any]:
    return {**versions(), "rows": rows_for(tmp, quick)}


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    return {"runtimes": RUNTIMES, **{k: md.version(p) if available(r) else None for k, r, p in (
        ("openvino", "openvino", "openvino"), ("tvm", "tvm", "apache-tvm"), ("litert", "litert", "ai-edge-litert"))}}


def rows_for(tmp: str, quick: bool) -> list[dict[str, Any]]:
    rounds = 2 if quick else 5
    rows: list[dict[str, Any]] = []
    d = load_digits32()
    test_x, test_y = (d.test_x[:64], d.test_y[:64]) if quick else (d.test_x, d.test_y)
    for net in ("resnet18", "mobilenet_v2"):
        model = trained(net)
        calib = [d.train_x[i:i + 32] for i in range(0, 256, 32)]
        configs = [("FP32", lambda model=model: model),
                   ("int8", lambda model=model, calib=calib: sk.quantize(model, "int8", calib_data=calib)),
                   ("pruned 50%", lambda model=model: sk.prune(model, {"method": "structured", "sparsity": 0.5},
                                                               example_inputs=d.test_x[:2]))]
        rows += suite(tmp, net, model, configs, test_x,
                      lambda out: {"accuracy": float(100 * np.mean(out.argmax(1) == test_y.numpy()))},
                      d.test_x[:1], d.test_x[:8], rounds)
    lite = efficientnet_lite("lite1")
    calib_l = preprocess(photo_crops(16 if quick else 64, 240, "calibration"))
    evals = preprocess(photo_crops(16 if quick else 64, 240, "evaluation"))
    with torch.no_grad():
        ref_top = torch.cat([lite(evals[i:i + 16]) for i in range(0, len(evals), 16)]).argmax(1).numpy()
    configs = [("FP32", lambda: lite),
               ("int8", lambda: sk.quantize(lite, "int8", calib_data=[calib_l[i:i + 16] for i in range(0, len(calib_l), 16)])),
               ("pruned 50%", lambda: sk.prune(lite, {"method": "structured", "sparsity": 0.5}, example_inputs=evals[:1]))]
    rows += suite(tmp, "efficientnet-lite1", lite, configs, evals,
                  lambda out: {"top1_agreement": float(np.mean(out.argmax(1) == ref_top))}, evals[:1], evals[:8], rounds)
    from slimkit.zoo.minilm import minilm, tokenize

    mini, tok = minilm()
    paras = docstring_sentences(every_paragraph=True)
    n_eval = 64 if quick else 256
    calib_m = [tokenize(tok, paras[i:i + 16]) for i in range(0, 64 if quick else 128, 16)]
    evals_m = tokenize(tok, paras[-n_eval:])
    with torch.no_grad():
        ref = torch.cat([mini(**_slice(evals_m, i, i + 64)) for i in range(0, n_eval, 64)]).numpy()

    def cosine(out: np.ndarray) -> dict[str, float]:
        c = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
        return {"cosine": float(c.mean())}

    configs = [("FP32", lambda: mini)] + [(p, lambda p=p: sk.quantize(mini, p, calib_data=calib_m))
                                          for p in ("int8", "int8-dynamic", "int4-weight")]
    rows += suite(tmp, "all-MiniLM-L6-v2", mini, configs, evals_m, cosine, _slice(evals_m, 0, 1), _slice(evals_m, 0, 8),
                  rounds)
    return rows


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# slimkit's files in ONNX Runtime, OpenVINO, Apache TVM and LiteRT ({res['machine']})", "",
             f"onnxruntime {res['onnxruntime']}, openvino {res['openvino']}, tvm {res['tvm']}, ai-edge-litert "
             f"{res.get('litert')}, torch {res['torch']}. "
             "Each file exported with export_onnx(target=runtime) (TVM: static shapes, one file per batch size, "
             "4-bit layers as plain ONNX; LiteRT: target='tflite', slimkit's own ONNX -> TFLite converter, CNNs only, "
             "run with LiteRT's default XNNPACK delegate). Parity: relative L2 of the runtime's outputs from the PyTorch model's. "
             "Fidelity: digits accuracy, top-1 agreement with FP32 PyTorch (Lite1, photo crops) or embedding cosine "
             "with FP32 PyTorch (MiniLM, 64 tokens). Latency: 2 threads, median of interleaved rounds, as a ratio to "
             "the FP32 file in the same runtime. TVM: default LLVM schedules, untuned. Pruned rows: 50% structured, "
             "not fine-tuned (a speed row).", "",
             "| model | config | runtime | loads | parity | fidelity | size MB | batch 1 | batch 8 | runs in |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if not r.get("loads"):
            lines.append(f"| {r['model']} | {r['config']} | {r['runtime']} | no: {r.get('error', '')} | | | | | | |")
            continue
        fid = (f"{r['accuracy']:.2f}%" if "accuracy" in r else f"{r['top1_agreement']:.3f}" if "top1_agreement" in r
               else f"{r['cosine']:.4f}")
        where = ""
        kernels = r.get("openvino_kernels") or r.get("litert_kernels")
        if kernels:
            where = ", ".join(f"{k} {'/'.join(f'{p}:{n}' for p, n in v.items())}" for k, v in kernels.items())
        elif r["lint"]:
            where = r["lint"][0]
        lines.append(f"| {r['model']} | {r['config']} | {r['runtime']} | yes | {r['parity_rel_l2']:.1e} | {fid} | "
                     f"{r['size_mb']:.2f} | {r.get('b1_x', float('nan')):.2f}x ({r.get('b1_ms', float('nan')):.2f} ms) | "
                     f"{r.get('b8_x', float('nan')):.2f}x ({r.get('b8_ms', float('nan')):.2f} ms) | {where} |")
    lines += ["", f"Run took {res['seconds']:.0f} s."]
    if "litert_run" in res:
        lr = res["litert_run"]
        lines.append(f"The LiteRT rows were re-run alone on {lr['when']} on {lr['machine']} ({lr['seconds']:.0f} s, "
                     "`--only litert`).")
    return "\n".join(lines)


def _rerun_litert(quick: bool) -> None:
    """``--only litert``: the LiteRT rows alone, merged into the committed results."""
    global RUNTIMES
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    res = json.loads((RESULTS / "runtimes.json").read_text())
    RUNTIMES = ["litert"]
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = rows_for(tmp, quick)
    res["rows"] = [r for r in res["rows"] if r["runtime"] != "litert"] + fresh
    res["runtimes"] = [*dict.fromkeys([*res["runtimes"], "litert"])]
    res["litert"] = versions()["litert"]
    res["litert_run"] = {"machine": machine(), "seconds": time.time() - t, "when": time.strftime("%Y-%m-%d")}
    write_results("runtimes", res, markdown, None, quick)


def main() -> None:
    if "--only" in sys.argv:
        if sys.argv[sys.argv.index("--only") + 1] != "litert":
            raise SystemExit("--only takes litert")
        _rerun_litert("--quick" in sys.argv)
        return
    bench_main("runtimes", run, markdown)


if __name__ == "__main__":
    main()
