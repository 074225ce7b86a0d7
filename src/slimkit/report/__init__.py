"""The report of a run folder (a recipe's, or ``slimkit demo``'s): ``report.md`` and a self-contained
``report.html`` (images inlined), with the plots users look at: the Pareto front of latency and size
against the metric (FP32, every stage, every tuner trial and the peers), per-layer sensitivity to
weight quantization, per-layer sparsity and bit width, and the ONNX Runtime / PyTorch parity.

The input is the folder's ``results.json``; nothing is recomputed.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from slimkit.core.files import write_atomic

__all__ = ["write_report", "markdown", "stage_row"]


def stage_row(stage: str, metrics: dict[str, Any], base: dict[str, Any], config: Any = None) -> dict[str, Any]:
    """One row of ``results.json``'s ``stages``: a measurement (``Measurement.to_dict()``) with its
    ratios to the FP32 measurement ``base``."""
    return {"stage": stage, "config": config, "label": metrics["label"], "metric": metrics["metric"],
            "latency_ms": metrics["latency_ms"], "latency_x": metrics["latency_ms"] / base["latency_ms"],
            "size_bytes": metrics["size_bytes"], "size_x": metrics["size_bytes"] / base["size_bytes"],
            "params": metrics["params"], "parity_rel_l2": metrics["parity_rel_l2"], "path": metrics["path"]}


def _points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured model: stages, tuner trials and peers, with the FP32 reference first."""
    base = results["stages"][0]
    pts = [{"label": r["label"], "metric": r["metric"], "latency_ms": r["latency_ms"], "size_bytes": r["size_bytes"],
            "group": "FP32" if i == 0 else "stage"} for i, r in enumerate(results["stages"])]
    tuner = results.get("tuner") or {}
    for t in tuner.get("trials", [])[1:]:
        pts.append({**{k: t[k] for k in ("label", "metric", "latency_ms", "size_bytes")}, "group": "tuner trial"})
    for p in tuner.get("peers", []):
        pts.append({**{k: p[k] for k in ("label", "metric", "latency_ms", "size_bytes")}, "group": "peer"})
    for p in results.get("peers", []):
        pts.append({**p, "group": "peer"})
    for p in pts:
        p["latency_x"] = p["latency_ms"] / base["latency_ms"]
        p["size_x"] = p["size_bytes"] / base["size_bytes"]
    return pts


def _plots(results: dict[str, Any], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    pts = _points(results)
    style = {"FP32": ("black", "*", 160), "stage": ("tab:blue", "o", 60), "tuner trial": ("tab:gray", ".", 50),
             "peer": ("tab:red", "^", 70)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "latency_x", "latency vs FP32 (ONNX Runtime, batch 1)"),
                          (axes[1], "size_x", "ONNX file size vs FP32")):
        for group, (color, marker, size) in style.items():
            g = [p for p in pts if p["group"] == group]
            if g:
                ax.scatter([p[key] for p in g], [p["metric"] for p in g], c=color, marker=marker, s=size, label=group)
        front = sorted(pts, key=lambda p: (p[key], -p["metric"]))
        best: list[dict[str, Any]] = []
        for p in front:
            if p["group"] != "peer" and (not best or p["metric"] > best[-1]["metric"]):
                best.append(p)
        ax.plot([p[key] for p in best], [p["metric"] for p in best], drawstyle="steps-post", c="tab:green", lw=1,
                marker="o", ms=13, mfc="none", label="Pareto front")
        for p in pts:
            if p["group"] != "tuner trial":
                ax.annotate(p["label"], (p[key], p["metric"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(name)
        ax.set_ylabel("metric (higher is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths["pareto"] = out / "report_pareto.png"
    fig.savefig(paths["pareto"], dpi=90)
    plt.close(fig)

    layers = results.get("layers") or []
    if layers:
        names = [r["layer"] for r in layers]
        fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.35 * len(names)), 8.5), sharex=True)
        widths = sorted({b for r in layers for b in r["sqnr_db"]}, key=int, reverse=True)
        w = 0.8 / max(len(widths), 1)
        for j, b in enumerate(widths):
            axes[0].bar([i + w * (j - (len(widths) - 1) / 2) for i in range(len(names))],
                        [r["sqnr_db"].get(b, 0) for r in layers], w, label=f"{b}-bit weights")
        axes[0].set_ylabel("output SQNR, dB")
        axes[0].set_title("sensitivity: the original model with one layer's weights quantized (lower is more sensitive)")
        axes[0].legend(fontsize=8)
        axes[1].bar(range(len(names)), [100 * r["sparsity"] for r in layers], color="tab:orange")
        axes[1].set_ylabel("removed or zero, %")
        axes[1].set_title("sparsity of the final model per layer")
        bits = [32 if r["bits"] == "float" else (0 if r["bits"] == "removed" else min(int(x) for x in r["bits"].split(",")
                if x.isdigit()) if any(x.isdigit() for x in r["bits"].split(",")) else 32) for r in layers]
        axes[2].bar(range(len(names)), bits, color="tab:purple")
        axes[2].set_ylabel("weight bits (32 = float)")
        axes[2].set_title("bit width of the final model per layer")
        axes[2].set_xticks(range(len(names)), names, rotation=70, fontsize=7)
        fig.tight_layout()
        paths["layers"] = out / "report_layers.png"
        fig.savefig(paths["layers"], dpi=90)
        plt.close(fig)

    stages = [r for r in results["stages"] if r.get("parity_rel_l2") is not None]
    if stages:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.bar(range(len(stages)), [max(r["parity_rel_l2"], 1e-12) for r in stages], color="tab:cyan")
        ax.set_yscale("log")
        ax.set_xticks(range(len(stages)), [r["label"] for r in stages], rotation=20, fontsize=8)
        ax.set_ylabel("relative L2, ORT vs PyTorch")
        ax.set_title("parity of each exported model")
        fig.tight_layout()
        paths["parity"] = out / "report_parity.png"
        fig.savefig(paths["parity"], dpi=90)
        plt.close(fig)
    return paths


def markdown(results: dict[str, Any], images: dict[str, Path] | None = None) -> str:
    """The report as markdown (tables, and the plots as image links when given)."""
    lines = [f"# slimkit report: {results.get('recipe', '')}", "",
             f"Model: `{json.dumps(results.get('model'))}`; data `{results.get('data')}`; metric `{results.get('evaluate')}`, "
             "measured on each exported ONNX file in ONNX Runtime (CPU, 2 threads). Latency: batch 1, median.", "",
             "| stage | model | metric | latency ms | latency vs FP32 | size kB | size vs FP32 | parameters | parity (rel. L2) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["stages"]:
        parity = "-" if r.get("parity_rel_l2") is None else f"{r['parity_rel_l2']:.1e}"
        lines.append(f"| {r['stage']} | {r['label']} | {r['metric']:.4g} | {r['latency_ms']:.3f} | {r['latency_x']:.2f}x | "
                     f"{r['size_bytes'] / 1e3:.0f} | {r['size_x']:.3f}x | {r['params'] or '-'} | {parity} |")
    tuner = results.get("tuner")
    if tuner:
        ref = tuner["reference"]
        lines += ["", f"## Tuner: picked {tuner['best']['label']} ({tuner['stopped']})", "",
                  "| trial | metric | latency ms | latency vs FP32 | size kB | within budget |", "|---|---|---|---|---|---|"]
        pareto = set(tuner.get("pareto", []))
        floor = ref["metric"] - (tuner.get("max_drop") or 0)
        for t in [*tuner["trials"], *tuner.get("peers", [])]:
            mark = " (Pareto)" if t["label"] in pareto else ""
            ok = "peer" if t.get("extra", {}).get("kind") == "peer" else ("yes" if t["metric"] >= floor - 1e-9 else "no")
            lines.append(f"| {t['label']}{mark} | {t['metric']:.4g} | {t['latency_ms']:.3f} | "
                         f"{t['latency_ms'] / ref['latency_ms']:.2f}x | {t['size_bytes'] / 1e3:.0f} | {ok} |")
    layers = results.get("layers") or []
    if layers:
        widths = sorted({b for r in layers for b in r["sqnr_db"]}, key=int, reverse=True)
        lines += ["", "## Layers", "", "| layer | parameters (original) | removed or zero | bits | "
                  + " | ".join(f"SQNR {b}-bit dB" for b in widths) + " |", "|---|---|---|---|" + "---|" * len(widths)]
        for r in layers:
            lines.append(f"| {r['layer']} | {r['params']} ({r['original_params']}) | {100 * r['sparsity']:.1f}% | {r['bits']} | "
                         + " | ".join(f"{r['sqnr_db'].get(b, float('nan')):.1f}" for b in widths) + " |")
    for key, path in (images or {}).items():
        lines += ["", f"![{key}]({path.name})"]
    return "\n".join(lines) + "\n"


def _html(md_text: str, images: dict[str, Path]) -> str:
    """A self-contained page: the markdown tables as HTML tables, the plots inlined as data URIs."""
    body: list[str] = []
    rows: list[str] = []

    def flush() -> None:
        if rows:
            body.append("<table>" + "".join(rows) + "</table>")
            rows.clear()

    for line in md_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        flush()
        if line.startswith("!["):
            key = line[2:line.index("]")]
            data = base64.b64encode(images[key].read_bytes()).decode()
            body.append(f'<figure id="{key}"><img alt="{key}" src="data:image/png;base64,{data}"></figure>')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush()
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>slimkit report</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def write_report(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the plots from ``folder/results.json``; returns the paths."""
    out = Path(folder)
    src = out / "results.json"
    if not src.exists():
        raise FileNotFoundError(f"{src} is missing: {out} is not a finished slimkit run")
    try:
        results = json.loads(src.read_text())
        results["stages"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{src} is corrupt: {e}") from e
    images = _plots(results, out)
    md_text = markdown(results, images)
    write_atomic(out / "report.md", md_text)
    write_atomic(out / "report.html", _html(md_text, images))
    return {"md": out / "report.md", "html": out / "report.html", **images}
