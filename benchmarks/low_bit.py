"""Benchmark: the PTQ passes for low bit widths -- cross-layer equalization (CLE), bias correction
(BC) and AdaRound --, quantization-aware training (STE, LSQ, PACT) and mixed precision from
sensitivity, against round-to-nearest, FP32 and ONNX Runtime's quantize_static.

On the digits-trained ResNet-18- and MobileNetV2-shaped nets, every model exported and run in ONNX
Runtime: test accuracy and the output SQNR against FP32's logits (SQNR separates the methods where
accuracy on an easy task does not). W8A8 per-tensor (where CLE matters), W8A8 per-channel (the
default), and W4A8 per-channel. QAT: one epoch of the digits training set (the nets trained for 6
and 5), learning rate 5e-4 (1% of the original), from the PTQ-calibrated model. Mixed precision:
4- or 8-bit weights per layer for a size budget (5 bits per weight on average) or a fidelity budget
(30 dB on the calibration images). Targets: AdaRound's SQNR above round-to-nearest's at W4A8 on both
nets; CLE + BC lift per-tensor MobileNetV2 INT8; QAT W4A8 within 1 point of FP32 accuracy.

Writes benchmarks/results/low_bit.{json,md}.

    python benchmarks/low_bit.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch
from _common import machine, write_results

import slimkit as sk
from slimkit.data import batches, load_digits32
from slimkit.export.peers import ort_quantize_static
from slimkit.export.runtime import feeds, session
from slimkit.zoo import trained

log = logging.getLogger("low_bit")

Q = sk.quant
W4, W8, PT = Q.Weights(bits=4, reduce_range=False), Q.Weights(), Q.Weights(per_channel=False)
ACT, CLE, BC, ADA = Q.Activations(), Q.Equalize(), Q.BiasCorrection(), Q.AdaRound()
CONFIGS: list[tuple[str, Any]] = [
    ("W8A8 per-tensor, nearest", [PT, ACT]),
    ("W8A8 per-tensor + CLE", [PT, ACT, CLE]),
    ("W8A8 per-tensor + CLE + BC", [PT, ACT, CLE, BC]),
    ("W8A8 per-channel, nearest (int8)", [W8, ACT]),
    ("W8A8 per-channel + CLE + BC (int8-cle)", [W8, ACT, CLE, BC]),
    ("W4A8 per-channel, nearest", [W4, ACT]),
    ("W4A8 + CLE", [W4, ACT, CLE]),
    ("W4A8 + BC", [W4, ACT, BC]),
    ("W4A8 + CLE + BC", [W4, ACT, CLE, BC]),
    ("W4A8 + AdaRound", [W4, ACT, ADA]),
    ("W4A8 + AdaRound + BC", [W4, ACT, ADA, BC]),
    ("W4/W8 mixed, size budget 5 bits", [W8, ACT, Q.MixedPrecision(bits=(4, 8), target_bits=5.0)]),
    ("W4/W8 mixed, fidelity budget 30 dB", [W8, ACT, Q.MixedPrecision(bits=(4, 8), target_sqnr_db=30.0)]),
]
W4, PT = {"weight_bits": 4, "reduce_range": False}, {"per_channel": False}  # the QAT configs' fields
QAT = {"epochs": 1, "lr": 5e-4}
QAT_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("W8A8 per-tensor QAT (STE)", {**PT, **QAT}),
    ("W4A8 QAT (STE)", {**W4, **QAT}),
    ("W4A8 QAT LSQ", {**W4, **QAT, "method": "lsq"}),
    ("W4A8 QAT PACT", {**W4, **QAT, "method": "pact"}),
    ("W4A8 QAT LSQ + distillation", {**W4, **QAT, "method": "lsq", "distill": True}),
]


def weight_bits(q: torch.nn.Module) -> float:
    """Average weight bits per quantized weight (8 for reduce_range's 7-bit weights: int8 storage)."""
    plan = q.slimkit_plan  # type: ignore[union-attr]
    mixed = plan.passes.get("mixed_precision")
    if mixed:
        return float(mixed["average_bits"])
    return float(plan.config.weights.bits)


def ort_logits(path: str, x: torch.Tensor) -> np.ndarray:
    s = session(path)
    return np.concatenate([s.run(None, feeds(s, x[i:i + 120]))[0] for i in range(0, len(x), 120)])


def measure(path: str, x: torch.Tensor, y: torch.Tensor, ref: np.ndarray) -> dict[str, float]:
    out = ort_logits(path, x)
    return {"accuracy": float(100 * np.mean(out.argmax(1) == y.numpy())),
            "sqnr_db": float(10 * np.log10((ref ** 2).sum() / ((out - ref) ** 2).sum()))}


def run(tmp: str, quick: bool) -> list[dict[str, Any]]:
    d = load_digits32()
    calib = batches(d.train_x[:256], None, 64)
    rows = []
    for net in ("resnet18", "mobilenet_v2"):
        model = trained(net)
        fp32 = sk.export_onnx(model, f"{tmp}/{net}.onnx", d.test_x[:4]).path
        ref = ort_logits(fp32, d.test_x)
        rows.append({"net": net, "config": "FP32", "accuracy": measure(fp32, d.test_x, d.test_y, ref)["accuracy"],
                     "sqnr_db": None, "seconds": 0.0, "weight_bits": 32.0})
        for label, per_channel in (("ORT quantize_static W8A8 per-tensor (minmax)", False),
                                   ("ORT quantize_static W8A8 per-channel (minmax)", True)):
            t = time.time()
            p = ort_quantize_static(fp32, f"{tmp}/{net}_ort.onnx", calib, "minmax", per_channel=per_channel)
            rows.append({"net": net, "config": label, **measure(p, d.test_x, d.test_y, ref), "seconds": time.time() - t,
                         "weight_bits": 8.0})
        train = batches(d.train_x[:256] if quick else d.train_x, d.train_y[:256] if quick else d.train_y, 32)
        jobs = [(label, cfg, False) for label, cfg in (CONFIGS[:1] + CONFIGS[-3:] if quick else CONFIGS)]
        jobs += [(label, cfg, True) for label, cfg in (QAT_CONFIGS[1:2] if quick else QAT_CONFIGS)]
        for label, cfg, is_qat in jobs:
            if quick and not is_qat and ADA in cfg:
                cfg = [Q.AdaRound(iterations=100) if p == ADA else p for p in cfg]
            t = time.time()
            q = sk.qat(model, cfg, train, calib_data=calib) if is_qat else sk.quantize(model, cfg, calib_data=calib)
            seconds = time.time() - t
            path = sk.export_onnx(q, f"{tmp}/{net}_q.onnx", d.test_x[:4]).path
            row = {"net": net, "config": label, **measure(path, d.test_x, d.test_y, ref), "seconds": seconds,
                   "weight_bits": weight_bits(q)}
            if "mixed_precision" in q.slimkit_plan.passes:
                row["layer_bits"] = q.slimkit_plan.passes["mixed_precision"]["bits"]
            log.info("%s %s: %s", net, label, row)
            rows.append(row)
    return rows


def markdown(res: dict[str, Any]) -> str:
    m = [f"# low_bit: equalization, bias correction, AdaRound, QAT and mixed precision ({res['machine']})", "",
         "Digits-trained nets, 256 calibration images, every model exported and run in ONNX Runtime; accuracy on the "
         "360 test digits (one digit is 0.28 points) and SQNR of the logits against FP32's (higher is better; every "
         "3 dB halves the noise). ORT quantize_static has no 4-bit convolution weights, so it has W8A8 rows only. "
         f"AdaRound: {res['adaround_iterations']} iterations per layer.", ""]
    for net in ("resnet18", "mobilenet_v2"):
        m += [f"## {net}", "", "| config | weight bits | accuracy % | SQNR dB | seconds (QAT: training) |", "|---|---|---|---|---|"]
        for r in res["rows"]:
            if r["net"] == net:
                sq = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f}"
                m.append(f"| {r['config']} | {r['weight_bits']:.2f} | {r['accuracy']:.2f} | {sq} | {r['seconds']:.1f} |")
        m.append("")
    return "\n".join(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script; writes to the temp folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        res = {"machine": machine(), "adaround_iterations": 100 if args.quick else sk.quant.AdaRound().iterations,
               "rows": run(tmp, args.quick)}
    write_results("low_bit", res, markdown, quick=args.quick)


if __name__ == "__main__":
    main()
