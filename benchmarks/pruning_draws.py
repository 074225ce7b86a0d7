"""Benchmark: is the mixed CNN's accuracy gap to Torch-Pruning (``pruning_peer.md``) the rule or
the draw? The same comparison as ``pruning_peer.py`` (50% of each layer's channels by L1
magnitude, the classifier kept, 2 epochs of the same distillation fine-tuning, 8 fine-tuning
seeds) on four trainings of the zoo's mixed CNN: the shipped weights (seed 0) and trainings from
seeds 1, 2 and 3 (``trained("mixed_cnn", seed)``, cached after the first run). The two tools keep
the same channels everywhere but in the pointwise -> grouped -> depthwise chains, where slimkit
keeps the best channels of each conv group and Torch-Pruning the same in-group positions in
every group. Accuracy of the pruned PyTorch models on the digits test set (their ONNX files
match them: ``pruning_peer.md``).

    python benchmarks/pruning_draws.py [--quick]
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from _common import bench_main
from pruning_peer import n_params, torch_pruning

import slimkit as sk
from slimkit.data import batches, load_digits32
from slimkit.train import fit
from slimkit.zoo import trained

log = logging.getLogger("pruning_draws")


def run(tmp: str, quick: bool) -> dict[str, Any]:
    d = load_digits32()
    train = batches(d.train_x[: 512 if quick else None], d.train_y[: 512 if quick else None], 32)
    seeds = 2 if quick else 8
    rows = []
    for draw in (0, 1) if quick else (0, 1, 2, 3):
        model = trained("mixed_cnn", seed=draw)
        ex = d.test_x[:2]
        with torch.no_grad():
            base = float(100 * (model(d.test_x).argmax(1) == d.test_y).float().mean())
        pruned = {"slimkit": sk.prune(model, {"method": "structured", "sparsity": 0.5}, example_inputs=ex),
                  "Torch-Pruning": torch_pruning(model, ex, model.fc)}
        for tool, p in pruned.items():
            accs = []
            for seed in range(seeds):
                m = copy.deepcopy(p)
                fit(m, train, epochs=2, lr=0.01, teacher=model, seed=seed)
                with torch.no_grad():
                    accs.append(float(100 * (m.eval()(d.test_x).argmax(1) == d.test_y).float().mean()))
            rows.append({"draw": draw, "tool": tool, "fp32_accuracy": base, "params_x": n_params(p) / n_params(model),
                         "accuracy": float(np.mean(accs)), "runs": accs})
            log.info("%s", rows[-1])
    return {"seeds": seeds, "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Mixed CNN: slimkit against Torch-Pruning over four trainings ({res['machine']})", "",
             f"torch {res['torch']}. 50% structured (L1), then 2 epochs of distillation fine-tuning; accuracy on the "
             f"digits test set (360 images: one image is 0.28 points), the mean of {res['seeds']} fine-tuning seeds.",
             "", "| training | FP32 | params | slimkit | Torch-Pruning | slimkit - Torch-Pruning |", "|---|---|---|---|---|---|"]
    draws = sorted({r["draw"] for r in res["rows"]})
    diffs = []
    for dr in draws:
        ours = next(r for r in res["rows"] if r["draw"] == dr and r["tool"] == "slimkit")
        peer = next(r for r in res["rows"] if r["draw"] == dr and r["tool"] == "Torch-Pruning")
        diffs.append(ours["accuracy"] - peer["accuracy"])
        label = "shipped (seed 0)" if dr == 0 else f"seed {dr}"
        lines.append(f"| {label} | {ours['fp32_accuracy']:.2f}% | {ours['params_x']:.3f}x / {peer['params_x']:.3f}x | "
                     f"{ours['accuracy']:.2f}% | {peer['accuracy']:.2f}% | {diffs[-1]:+.2f} |")
    mo = np.mean([r["accuracy"] for r in res["rows"] if r["tool"] == "slimkit"])
    mp = np.mean([r["accuracy"] for r in res["rows"] if r["tool"] == "Torch-Pruning"])
    lines += [f"| mean | | | {mo:.2f}% | {mp:.2f}% | {mo - mp:+.2f} |", "", f"Run took {res['seconds']:.0f} s."]
    return "\n".join(lines)


def main() -> None:
    bench_main("pruning_draws", run, markdown)


if __name__ == "__main__":
    main()
