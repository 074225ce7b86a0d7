"""Benchmark: slimkit's structured pruning against Torch-Pruning (its PyPI package), the peer, at the
same nominal sparsity (50% of each layer's channels, L1 magnitude, the classifier kept), in one run.

Models: the digits-trained zoo ResNet-18, MobileNetV2 (residual adds, depthwise convs) and mixed CNN
(``slimkit.zoo.mixed``: a residual add, a concatenation, grouped and depthwise convs, squeeze-excite
gating, flatten into the classifier), and the ImageNet-trained EfficientNet-Lite1
(``slimkit.zoo.efficientnet_lite``: depthwise, ReLU6, TensorFlow padding). Both pruned copies get the
same treatment afterwards: on the digits, the same fine-tuning (``fit``: SGD lr 0.01, distillation
from the unpruned model); on Lite1, whose training data is not here, BatchNorm statistics
re-estimated on 256 photo crops, then the same distillation from the unpruned model on those crops
(labels: its own top-1). Reported: parameters left,
latency in ONNX Runtime (2 threads) as a ratio to the FP32 file, timed in interleaved rounds, and
accuracy (digits test set) or top-1 agreement with FP32 (Lite1, 64 other photo crops), each file
run in ONNX Runtime.

    python benchmarks/pruning_peer.py [--quick]
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from _common import bench_main
from torch import nn

import slimkit as sk
from slimkit.core.bn import recalibrate_batchnorm
from slimkit.data import batches, load_digits32
from slimkit.data.photos import photo_crops
from slimkit.export.runtime import compare_latency, feeds, session
from slimkit.train import fit
from slimkit.zoo import trained
from slimkit.zoo.efficientnet_lite import efficientnet_lite, preprocess

log = logging.getLogger("pruning_peer")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def predictions(path: str, x: torch.Tensor) -> np.ndarray:
    s = session(path)
    return np.concatenate([s.run(None, feeds(s, x[i:i + 64]))[0] for i in range(0, len(x), 64)]).argmax(1)


def torch_pruning(model: nn.Module, example: torch.Tensor, classifier: nn.Module) -> nn.Module:
    """Torch-Pruning's MagnitudePruner at a ratio of 0.5 per layer, L1, the classifier ignored."""
    import torch_pruning as tp

    out = copy.deepcopy(model).eval()
    head = dict(model.named_modules())
    name = next(n for n, m in head.items() if m is classifier)
    pruner = tp.pruner.MagnitudePruner(out, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[out.get_submodule(name)])
    pruner.step()
    return out


def compare(tmp: str, net: str, model: nn.Module, classifier: nn.Module, example: torch.Tensor,
            after: Any, score: Any, latency_x: torch.Tensor, rounds: int, seeds: int) -> list[dict[str, Any]]:
    """FP32 and both pruned nets; each pruned net is tuned ``seeds`` times (``after(copy, seed)``) and
    its score is the mean over those runs (the first run's file is timed)."""
    ours = sk.prune(model, {"method": "structured", "sparsity": 0.5}, example_inputs=example)
    peer = torch_pruning(model, example, classifier)
    rows, paths = [], []
    for label, m in (("FP32", model), ("slimkit structured l1 50%", ours), ("Torch-Pruning magnitude l1 50%", peer)):
        runs: list[dict[str, float]] = []
        for seed in range(1 if m is model else seeds):
            tuned = m if m is model else copy.deepcopy(m)
            if m is not model:
                after(tuned, seed)
            path = sk.export_onnx(tuned.eval(), f"{tmp}/{net}_{len(rows)}_{seed}.onnx", example).path
            paths += [path] if seed == 0 else []
            runs.append(score(path))
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        spread = {f"{k}_runs": [r[k] for r in runs] for k in runs[0]}
        rows.append({"net": net, "config": label, "params_x": n_params(m) / n_params(model), **mean, **spread})
        log.info("%s %s: %s", net, label, rows[-1])
    for bs in (1, 8):
        lat = compare_latency(paths, latency_x[:bs], rounds=rounds)
        for row, t in zip(rows, lat, strict=True):
            row[f"ms_b{bs}"] = t["median_ms"]
            row[f"x_b{bs}"] = t["median_ms"] / lat[0]["median_ms"]
    return rows


def run(tmp: str, quick: bool) -> dict[str, Any]:
    import torch_pruning

    d = load_digits32()
    train = batches(d.train_x[: 512 if quick else None], d.train_y[: 512 if quick else None], 32)
    epochs = 1 if quick else 2
    seeds = 1 if quick else 8  # fine-tuning runs per pruned net: one image of 360 is 0.28 points
    rows: list[dict[str, Any]] = []
    rounds = 3 if quick else 7
    for net in ("resnet18", "mobilenet_v2", "mixed_cnn"):
        model = trained(net)
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

        def tune(m: nn.Module, seed: int, teacher: nn.Module = model) -> None:
            fit(m, train, epochs=epochs, lr=0.01, teacher=teacher, seed=seed)

        def digits_score(path: str) -> dict[str, float]:
            return {"accuracy": float(100 * np.mean(predictions(path, d.test_x) == d.test_y.numpy()))}

        rows += compare(tmp, net, model, classifier, d.test_x[:2], tune, digits_score, d.test_x[:8], rounds, seeds)
    lite = efficientnet_lite("lite1")
    calib = preprocess(photo_crops(64 if quick else 256, 240, "calibration"))
    evaluation = preprocess(photo_crops(16 if quick else 64, 240, "evaluation"))
    with torch.no_grad():
        pseudo = torch.cat([lite(calib[i:i + 32]).argmax(1) for i in range(0, len(calib), 32)])
    lite_train = [(calib[i:i + 16], pseudo[i:i + 16]) for i in range(0, len(calib), 16)]
    lite_epochs = 1 if quick else 3

    def recal(m: nn.Module, seed: int) -> None:
        recalibrate_batchnorm(m, [x for x, _ in lite_train])
        fit(m, lite_train, epochs=lite_epochs, lr=0.01, teacher=lite, seed=seed)

    first: dict[str, np.ndarray] = {}

    def agreement(path: str) -> dict[str, float]:
        pred = predictions(path, evaluation)
        first.setdefault("fp32", pred)
        return {"top1_agreement": float(np.mean(pred == first["fp32"]))}

    rows += compare(tmp, "efficientnet-lite1", lite, lite._fc, evaluation[:1], recal, agreement, evaluation[:8],
                    rounds, 1)
    return {"torch_pruning": torch_pruning.__version__, "finetune_epochs": epochs, "lite_crops": len(calib),
            "lite_epochs": lite_epochs, "seeds": seeds, "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Structured pruning against Torch-Pruning ({res['machine']})", "",
             f"onnxruntime {res['onnxruntime']}, torch {res['torch']}, torch-pruning {res['torch_pruning']}. "
             "50% of each layer's channels by L1 magnitude, the classifier kept. Digits nets: "
             f"{res['finetune_epochs']} epochs of the same fine-tuning after pruning (SGD lr 0.01, distillation from "
             f"the unpruned net), accuracy on the digits test set: the mean of {res['seeds']} fine-tuning runs (seeds "
             "0, 1, ...; each run in brackets). EfficientNet-Lite1: BatchNorm re-estimated on the "
             f"same {res['lite_crops']} photo crops, then {res['lite_epochs']} epochs of the same distillation from "
             "the unpruned net on them; top-1 agreement with FP32 on 64 other crops. Latency: ONNX Runtime, 2 threads, "
             "median of interleaved rounds, as a ratio to the FP32 file of the same run.", "",
             "| net | config | params | accuracy / agreement | batch 1 | batch 8 |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        runs = r.get("accuracy_runs", [])
        each = f" ({', '.join(f'{a:.2f}' for a in runs)})" if len(runs) > 1 else ""
        acc = f"{r['accuracy']:.2f}%{each}" if "accuracy" in r else f"{r['top1_agreement']:.3f}"
        lines.append(f"| {r['net']} | {r['config']} | {r['params_x']:.3f}x | {acc} | "
                     f"{r['x_b1']:.2f}x ({r['ms_b1']:.2f} ms) | {r['x_b8']:.2f}x ({r['ms_b8']:.2f} ms) |")
    lines += ["", f"Run took {res['seconds']:.0f} s."]
    return "\n".join(lines)


def main() -> None:
    bench_main("pruning_peer", run, markdown)


if __name__ == "__main__":
    main()
