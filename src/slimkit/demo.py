"""The demo: a CNN trained on the bundled digits, its INT8 version, and ONNX Runtime's own static
quantizer on the same model, each measured in ONNX Runtime for accuracy, file size and latency.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo", "markdown_table"]

log = logging.getLogger(__name__)


def _ort_accuracy(path: str, x: Any, y: Any) -> float:
    from slimkit.export.runtime import session

    sess = session(path)
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i : i + 128].numpy()})[0].argmax(1)
                           for i in range(0, len(x), 128)])
    return float(100.0 * np.mean(pred == y.numpy()))


def _agreement(path: str, ref_path: str, x: Any) -> float:
    from slimkit.export.runtime import session

    a, b = session(path), session(ref_path)
    pa = a.run(None, {a.get_inputs()[0].name: x.numpy()})[0].argmax(1)
    pb = b.run(None, {b.get_inputs()[0].name: x.numpy()})[0].argmax(1)
    return float(100.0 * np.mean(pa == pb))


def run_demo(out: str | os.PathLike[str], model_name: str = "resnet18", calib_size: int = 256) -> dict[str, Any]:
    """Run the demo, write ``results.json`` and ``results.md`` under ``out``, return the results."""
    import slimkit as sk
    from slimkit.data import batches, load_digits32
    from slimkit.export import measure_latency
    from slimkit.export.peers import ort_quantize_static
    from slimkit.zoo import trained

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = load_digits32()
    model = trained(model_name)
    calib = batches(d.train_x[:calib_size], None, 32)
    q = sk.quantize(model, "int8", calib_data=calib)
    fp32 = sk.export_onnx(model, out / "fp32.onnx", d.test_x[:32]).path
    ours = sk.export_onnx(q, out / "slimkit_int8.onnx", d.test_x[:32])
    peer = ort_quantize_static(fp32, str(out / "ort_quantize_static.onnx"), calib)
    sk.save(q, out / "slimkit_int8")
    rows: list[dict[str, Any]] = []
    one = d.test_x[:1]
    for label, path in [("FP32", fp32), ("slimkit int8", ours.path), ("ORT quantize_static", peer)]:
        lat = measure_latency(path, one, threads=2, runs=200, warmup=20)
        rows.append({
            "model": label,
            "accuracy": _ort_accuracy(path, d.test_x, d.test_y),
            "top1_agreement": _agreement(path, fp32, d.test_x),
            "size_kb": os.path.getsize(path) / 1e3,
            "latency_ms": lat["median_ms"],
        })
    base = rows[0]
    for r in rows:
        r["latency_x"] = r["latency_ms"] / base["latency_ms"]
        r["size_x"] = r["size_kb"] / base["size_kb"]
    result = {"model": f"{model_name} (digits, 1x32x32)", "batch": 1, "threads": 2, "rows": rows,
              "lint": ours.lint.to_dict(), "parity": str(ours.parity)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown_table(result))
    return result


def markdown_table(result: dict[str, Any]) -> str:
    lines = [f"Model: {result['model']}; ONNX Runtime CPU, batch {result['batch']}, {result['threads']} threads",
             "", "| model | accuracy % | top-1 agreement with FP32 % | size kB | size vs FP32 | latency ms | latency vs FP32 |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['accuracy']:.2f} | {r['top1_agreement']:.1f} | {r['size_kb']:.0f} | "
                     f"{r['size_x']:.2f}x | {r['latency_ms']:.3f} | {r['latency_x']:.2f}x |")
    return "\n".join(lines) + "\n"
