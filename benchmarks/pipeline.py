"""The tuner against each family alone and the peers, on the digits-trained ResNet-shaped net.

Question: with a 1-point accuracy budget, how fast a model (ONNX Runtime, batch 1, 2 threads) does
``slimkit.tune`` find within 10 minutes on 2 cores, and how does that compare with the best single
family (INT8 alone, structured pruning alone, Tucker factorization alone, a distilled thinner
student) and with ONNX Runtime's own ``quantize_static``?

Every candidate is an ONNX file; accuracy is measured on the 360 test digits in ONNX Runtime. The
final latencies come from one interleaved measurement of all the files (``compare_latency``: rounds
in which every file runs in turn), so the ratios to FP32 share the machine's state.

    python benchmarks/pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine, write_results

import slimkit as sk
from slimkit.data import digits_accuracy, task
from slimkit.export.peers import ort_quantize_static
from slimkit.export.runtime import compare_latency
from slimkit.measure import Measurement, first_rows, measure, measure_onnx
from slimkit.train import fit
from slimkit.tune import tune
from slimkit.zoo import resnet18, trained

log = logging.getLogger("pipeline")
BUDGET_S = 600.0
MAX_DROP = 1.0
EPOCHS = 5


def best_within(trials: list[Measurement], floor: float, kinds: tuple[str, ...]) -> Measurement | None:
    ok = [t for t in trials if t.extra.get("kind") in kinds and t.metric >= floor - 1e-9 and t.parity_ok]
    return min(ok, key=lambda t: t.latency_ms) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a short budget, results to the temp folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    budget = 60.0 if args.quick else BUDGET_S
    epochs = 1 if args.quick else EPOCHS
    tmp = Path(tempfile.mkdtemp(prefix="slimkit-pipeline-"))
    t = task()
    example, calib, train = t["example"], t["calib"], t["train"]
    model = trained("resnet18")

    t0 = time.perf_counter()
    tuned = tune(model, {"max_drop": MAX_DROP, "time_budget": budget, "objective": "latency", "finetune_epochs": epochs,
                         "sparsities": [0.3, 0.5, 0.7, 0.8, 0.9, 0.95], "depth": [0.4, 0.6, 0.8, 1.0],
                         "factorize_method": "tucker",
                         "factorize_ratios": [0.5]}, digits_accuracy, example, calib, tmp / "tuner", train_data=train)
    tune_s = time.perf_counter() - t0
    floor = tuned.reference.metric - MAX_DROP

    rows: list[tuple[str, Measurement]] = [("FP32", tuned.reference), ("tuner's pick", tuned.best)]
    for family, kinds in (("quantization alone (best INT8 calibrator)", ("quantize",)),
                          ("pruning alone (channels, then blocks; fine-tuned with distillation)", ("prune", "depth"))):
        pick = best_within(tuned.trials, floor, kinds)
        if pick is not None:
            rows.append((family, pick))

    # factorization alone: Tucker of the original at two budgets, fine-tuned like the tuner's trials
    for ratio in (0.5, 0.25):
        f = sk.factorize(model, {"method": "tucker", "ratio": ratio})
        fit(f, train, epochs=epochs, lr=0.01, teacher=model)
        rows.append((f"factorization alone (Tucker {ratio:.0%} of weights)",
                     measure(f.eval(), f"tucker {ratio:.0%}", str(tmp / f"tucker{ratio}.onnx"), example, digits_accuracy)))
    # distillation alone: a thinner ResNet of the same depth taught by the original
    torch.manual_seed(0)
    student = sk.distill(resnet18(width=6, in_channels=1, small_input=True), model, train,
                         {"epochs": 3 * epochs, "lr": 0.05})
    rows.append(("distillation alone (width-6 student)",
                 measure(student, "distilled student", str(tmp / "student.onnx"), example, digits_accuracy)))
    # peers: ONNX Runtime's own static quantizer on the FP32 file
    for method, rr in (("minmax", False), ("minmax", True), ("entropy", False)):
        name = f"ORT quantize_static ({method}{', reduce_range' if rr else ''})"
        path = ort_quantize_static(tuned.reference.path, str(tmp / f"ort_{method}_{rr}.onnx"), calib, method=method,
                                   reduce_range=rr)
        rows.append(("peer", measure_onnx(path, name, example, digits_accuracy)))

    log.info("interleaved latency of %d files", len(rows))
    paths = [m.path for _, m in rows]
    unique = list(dict.fromkeys(paths))  # the tuner's pick is also a family's best: one file, timed once
    timed = compare_latency(unique, first_rows(example, 1), rounds=7, seconds=1.0)
    lat = [timed[unique.index(p)] for p in paths]

    base_ms = lat[0]["median_ms"]
    table = []
    for (family, m), lt in zip(rows, lat, strict=True):
        table.append({"row": family, "model": m.label, "accuracy": m.metric, "within_budget": m.metric >= floor - 1e-9,
                      "latency_ms": lt["median_ms"], "latency_x": lt["median_ms"] / base_ms,
                      "latency_min_ms": lt["min_ms"], "latency_min_x": lt["min_ms"] / lat[0]["min_ms"],
                      "size_kb": m.size_bytes / 1e3,
                      "size_x": m.size_bytes / tuned.reference.size_bytes, "params": m.params})
    res: dict[str, Any] = {
        "machine": machine(), "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
        "budget_s": budget, "max_drop": MAX_DROP, "finetune_epochs": epochs, "tuner_seconds": tune_s,
        "tuner_stopped": tuned.stopped, "rows": table,
        "tuner_trials": [{"label": x.label, "accuracy": x.metric, "latency_ms": x.latency_ms, "size_kb": x.size_bytes / 1e3,
                          "seconds": x.seconds, "latency_single_ms": x.extra.get("latency_single_ms")}
                         for x in tuned.trials],
    }
    write_results("pipeline", res, markdown, quick=args.quick)


def markdown(res: dict[str, Any]) -> str:
    pick = res["rows"][1]
    lines = [f"# pipeline: the tuner against each family alone and the peers ({res['machine']})", "",
             f"onnxruntime {res['onnxruntime']}, torch {res['torch']}. The digits-trained ResNet-shaped net "
             f"(width 16, 1x32x32 input), accuracy on the 360 test digits measured on each ONNX file in ONNX Runtime. "
             f"Latency: batch 1, 2 threads, median over 7 interleaved rounds of 1 s per file (one run for every row, "
             f"so the ratios share the machine's state). Budget: at most {res['max_drop']:g} point below FP32.", "",
             f"The tuner ran {res['tuner_seconds']:.0f} s of its {res['budget_s']:.0f} s budget ({res['tuner_stopped']}) and "
             f"picked **{pick['model']}**: {pick['latency_x']:.2f}x FP32 latency, {pick['size_x']:.3f}x size, "
             f"{pick['accuracy']:.2f}% accuracy.", "",
             "| row | model | accuracy % | within budget | latency ms | latency vs FP32 | fastest run vs FP32's | size kB | size vs FP32 | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['row']} | {r['model']} | {r['accuracy']:.2f} | {'yes' if r['within_budget'] else 'no'} | "
                     f"{r['latency_ms']:.3f} | {r['latency_x']:.2f}x | {r['latency_min_x']:.2f}x | {r['size_kb']:.0f} | {r['size_x']:.3f}x | "
                     f"{r['params'] if r['params'] is not None else '-'} |")
    lines += ["", "## The tuner's trials, in order", "",
              "Latency as measured during the search (one trial at a time); the fastest were timed again at the end.", "",
              "| trial | accuracy % | latency ms | size kB | seconds |", "|---|---|---|---|---|"]
    for x in res["tuner_trials"]:
        lines.append(f"| {x['label']} | {x['accuracy']:.2f} | {x['latency_ms']:.3f} | {x['size_kb']:.0f} | {x['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
