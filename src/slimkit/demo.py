"""The demo: the whole story on the bundled digits, each model measured in ONNX Runtime for accuracy,
file size and batch-1 latency, side by side with FP32 and ONNX Runtime's own static quantizer:

1. the digits-trained CNN (FP32);
2. INT8 post-training quantization, and the ONNX Runtime ``quantize_static`` peer on the same model;
3. half of the channels pruned, fine-tuned with the original as teacher, then INT8;
4. the tuner's pick within 1 point of FP32 accuracy (a short time budget);

then ``results.json``, ``results.md`` (the table) and the report (``report.md``, ``report.html``).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["run_demo", "markdown_table"]

log = logging.getLogger(__name__)


def run_demo(out: str | os.PathLike[str], model_name: str = "resnet18", tune_budget: float = 120.0,
             finetune_epochs: int = 3) -> dict[str, Any]:
    """Run the demo into ``out`` (see the module doc) and return ``results.json``'s content."""
    import slimkit as sk
    from slimkit import api as sk_api
    from slimkit.core.files import write_atomic, write_json
    from slimkit.core.progress import log as progress
    from slimkit.data import digits_accuracy, task
    from slimkit.export.peers import ort_quantize_static
    from slimkit.measure import measure, measure_onnx
    from slimkit.report import stage_row, write_report
    from slimkit.report.layers import layer_table
    from slimkit.train import fit
    from slimkit.tune import tune
    from slimkit.zoo import trained

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress.info("demo 1/6: the digits-trained %s (the weights shipped with slimkit)", model_name)
    t = task()
    example, calib, train = t["example"], t["calib"], t["train"]
    model = trained(model_name)
    timing = {"runs": 200, "min_seconds": 1.0}

    def run(m: Any, label: str, name: str) -> dict[str, Any]:
        r = measure(m, label, str(out / f"{name}.onnx"), example, digits_accuracy, **timing)  # type: ignore[arg-type]
        return r.to_dict()

    progress.info("demo 2/6: FP32 exported and timed in ONNX Runtime")
    rows: list[tuple[str, dict[str, Any]]] = [("baseline", run(model, "FP32", "fp32"))]
    progress.info("demo 3/6: slimkit int8 and ONNX Runtime's quantize_static")
    q = sk.quantize(model, "int8", calib_data=calib)
    sk.save(q, out / "slimkit_int8")
    rows.append(("quantize", run(q, "slimkit int8", "slimkit_int8")))
    peer_path = ort_quantize_static(rows[0][1]["path"], str(out / "ort_quantize_static.onnx"), calib)
    peer = measure_onnx(peer_path, "ORT quantize_static", example, digits_accuracy, **timing).to_dict()  # type: ignore[arg-type]
    progress.info("demo 4/6: pruning half of the channels and fine-tuning with distillation")
    p = sk_api.prune(model, {"method": "structured", "sparsity": 0.5, "round_to": 8}, example_inputs=example, data=train[:8])
    fit(p, train, epochs=finetune_epochs, lr=0.01, teacher=model)
    rows.append(("prune + distill", run(p.eval(), "pruned 50% + distilled", "pruned")))
    rows.append(("prune + distill + quantize",
                 run(sk.quantize(p, "int8", calib_data=calib), "pruned 50% + distilled + int8", "pruned_int8")))
    progress.info("demo 5/6: the tuner, %.0f s", tune_budget)
    tuned = tune(model, {"max_drop": 1.0, "time_budget": tune_budget, "finetune_epochs": finetune_epochs,
                         "factorize_ratios": []}, digits_accuracy, example, calib, _fresh(out / "tuner"), train_data=train)
    best = tuned.best.to_dict()
    rows.append(("tune", {**run(tuned.model, f"tuner's pick: {best['label']}", "tuned")}))
    progress.info("demo 6/6: the report")
    base = rows[0][1]
    results = {"recipe": "slimkit demo", "model": {"factory": "slimkit.zoo:trained", "args": [model_name]},
               "data": "slimkit.data:task", "evaluate": "slimkit.data:digits_accuracy",
               "stages": [stage_row(kind, m, base) for kind, m in rows], "peers": [peer], "tuner": tuned.to_dict(),
               "layers": layer_table(copy.deepcopy(model), tuned.model, calib[:4]),
               "lint": rows[1][1]["extra"]["lint"]}
    write_json(out / "results.json", results)
    write_atomic(out / "results.md", markdown_table(results))
    write_report(out)
    return results


def _fresh(folder: Path) -> Path:
    """The demo's own tuner folder, emptied for a new run (a demo output folder is the demo's)."""
    import shutil

    if folder.exists() and (folder / "trials.jsonl").exists():
        shutil.rmtree(folder)
    return folder


def markdown_table(result: dict[str, Any]) -> str:
    base = result["stages"][0]
    lines = [f"Model: {result['model']['args'][0]} trained on digits (1x32x32); accuracy on the 360 test digits, "
             "measured on each ONNX file; ONNX Runtime CPU, batch 1, 2 threads, median latency", "",
             "| model | accuracy % | size kB | size vs FP32 | latency ms | latency vs FP32 |", "|---|---|---|---|---|---|"]
    for r in [*result["stages"], *result.get("peers", [])]:
        lines.append(f"| {r['label']} | {r['metric']:.2f} | {r['size_bytes'] / 1e3:.0f} | {r['size_bytes'] / base['size_bytes']:.3f}x | "
                     f"{r['latency_ms']:.3f} | {r['latency_ms'] / base['latency_ms']:.2f}x |")
    return "\n".join(lines) + "\n"
