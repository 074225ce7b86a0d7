"""Benchmark: which architectures each verb handles -- a breadth matrix, not a speed table.

Every tiny random-weight architecture of ``slimkit.zoo.archs`` (Hugging Face decoders, encoders,
T5, vision and speech models, ``nn.TransformerEncoder``, small CNNs, the zoo's own nets) against
every operation: ``fp32`` (no compression: the baseline for calling, saving and exporting),
``int8`` (calibrated on the example batch twice), ``int8-dynamic``, ``int8-smoothquant``,
``int4-weight``, ``int4-gptq``, ``int4-awq`` and ``nf4-weight`` (the presets with ``group_size`` 32, since the
presets' 128 divides none of these 32- and 64-wide layers; ``--group-size 0`` keeps 128), the float formats
``fp16``, ``fp16-weights`` and ``fp8`` (its peer: ONNX Runtime's FP8 ``quantize_static``), ``int8-tensorrt``, structured
and unstructured pruning at 50% and SVD at ratio 0.5. For each cell, in order and each stage run
even when an earlier one failed (after the operation itself):

- ``op``: the verb, under a time limit (``--timeout``);
- ``state``: the caller's model state dict is unchanged;
- ``call``: the result runs on the batch; cosine and relative L2 of its main output (``logits``,
  else ``last_hidden_state``, else the first tensor) against the float model's;
- ``save/load``: ``sk.save`` then ``sk.load`` on a freshly built base give the same outputs;
- ``export``: ``sk.export_onnx`` with its parity check.

A cell is ``ok``, ``fail`` (the first failing stage and its error, traced to the slimkit line it
came from), ``silent`` (no error, but cosine under 0.9 at 8 bits or 0.8 at 4 bits, and at 8 bits more than 0.02
under ONNX Runtime's ``quantize_dynamic`` on the same model, measured in the same run; pruning and SVD
are recorded, not judged) or ``n/a`` (the operation found nothing to act on). Each architecture runs
in its own process, so a crash costs one row.

Writes benchmarks/results/arch_coverage.{json,md} (a subset run: the temporary folder).

    python benchmarks/arch_coverage.py [--archs llama,bert] [--ops int8,export] [--timeout 300]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _common import machine, write_results
from torch import nn

import slimkit as sk
from slimkit.zoo.archs import ARCHS, Batch

log = logging.getLogger("arch_coverage")

OPS = [
    "fp32",
    "int8",
    "int8-dynamic",
    "int8-smoothquant",
    "int4-weight",
    "int4-gptq",
    "int4-awq",
    "nf4-weight",
    "fp16",
    "fp16-weights",
    "fp8",
    "int8-tensorrt",
    "prune-structured",
    "prune-unstructured",
    "svd",
]
CALIBRATED = {"int8", "int8-smoothquant", "int4-gptq", "int4-awq", "fp8", "int8-tensorrt", "fp16"}
SILENT_BELOW = {
    "int8": 0.9,
    "int8-dynamic": 0.9,
    "int8-smoothquant": 0.9,
    "int4-weight": 0.8,
    "int4-gptq": 0.8,
    "int4-awq": 0.8,
    "nf4-weight": 0.8,
    "fp16": 0.99,
    "fp16-weights": 0.99,
    "fp8": 0.9,
    "int8-tensorrt": 0.9,
}
STAGES = ["op", "state", "call", "save/load", "export"]


class CellTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def raise_timeout(signum: int, frame: Any) -> None:
        raise CellTimeout(f"over the {seconds} s limit")

    old = signal.signal(signal.SIGALRM, raise_timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_op(op: str, model: nn.Module, batch: Batch, group_size: int) -> nn.Module:
    if op == "fp32":
        return model
    if op.startswith(("int8", "int4", "nf4", "fp")):
        cfg = sk.quant.PRESETS[op]
        if op.startswith(("int4", "nf4")) and group_size:
            cfg = cfg.with_weights(group_size=group_size)
        return sk.quantize(model, cfg, calib_data=[batch] * 2 if op in CALIBRATED else None)
    if op.startswith("prune-"):
        return sk.prune(model, {"method": op.split("-")[1], "sparsity": 0.5}, example_inputs=batch)
    if op == "svd":
        return sk.factorize(model, {"method": "svd", "ratio": 0.5})
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def call(model: nn.Module, batch: Batch) -> Any:
    with torch.no_grad():
        if isinstance(batch, dict):
            return model(**batch)
        return model(*batch) if isinstance(batch, tuple) else model(batch)


def main_output(out: Any) -> torch.Tensor:
    """``logits``, else ``last_hidden_state``, else the first tensor of the output."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "keys"):
        for key in ("logits", "last_hidden_state"):
            if key in out and isinstance(out[key], torch.Tensor):
                return out[key]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            with contextlib.suppress(TypeError):
                return main_output(item)
    raise TypeError(f"no tensor in the output ({type(out).__name__})")


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != float model's {tuple(ref.shape)}")
    a, b = out.double().flatten(), ref.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
    return {"cosine": cos, "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30))}


def weights(model: nn.Module) -> tuple[int, int, int]:
    """(float weight elements in tensors of >= 2 dims, all parameter elements, zeros among the
    float weights), tied tensors counted once."""
    seen: set[int] = set()
    flt = params = zeros = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if isinstance(t, nn.Parameter):
            params += t.numel()
        if t.is_floating_point() and t.dim() >= 2:
            flt += t.numel()
            zeros += int((t == 0).sum())
    return flt, params, zeros


def _where(f: traceback.FrameSummary) -> str:
    return f"{re.sub(r'.*/(site-packages|src)/', '', f.filename)}:{f.lineno} ({f.name})"


def origin(e: BaseException) -> dict[str, Any]:
    """The exception; the deepest slimkit frame it passed through (over its chain of causes); and
    where its root cause was raised, the torch module-call plumbing left out."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
        chain.append(nxt)
    root = chain[-1]
    ours: list[str] = []
    for x in reversed(chain):  # the root cause's frames first: its slimkit frame is the deepest
        ours += [
            _where(f)
            for f in traceback.extract_tb(x.__traceback__)
            if "/slimkit/" in f.filename and "/zoo/archs" not in f.filename
        ]
    frames = [
        f
        for f in traceback.extract_tb(root.__traceback__)
        if not f.filename.endswith("torch/nn/modules/module.py")
    ]

    def first_line(x: BaseException) -> str:
        return f"{type(x).__name__}: {(str(x).strip().splitlines() or [''])[0][:400]}"

    return {
        "error": first_line(e),
        "root": first_line(root) if root is not e else None,
        "slimkit": ours[-1] if ours else None,
        "raised": _where(frames[-1]) if frames else None,
        "slimkit_frames": ours[-6:],
    }


def stage(cell: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    t = time.time()
    try:
        result = fn()
        cell["stages"][name] = {"ok": True}
        return result
    except Exception as e:  # the point of the matrix: record and go on
        cell["stages"][name] = {"ok": False, **origin(e)}
        log.info("%s %s %s: %s", cell["arch"], cell["op"], name, cell["stages"][name]["error"])
        return None
    finally:
        cell["stages"].setdefault(name, {})["seconds"] = round(time.time() - t, 2)


# a verb's clear word that there is nothing to do (every layer named with its reason): n/a, not a failure
NOTHING_TO_DO = re.compile(r"could be quantized with this config|nothing to prune in")

NO_CACHE = False  # --no-cache: models with a config get use_cache=False


def build(arch: str) -> tuple[nn.Module, Batch]:
    model, batch = ARCHS[arch].build()
    if NO_CACHE and hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # type: ignore[union-attr]
    return model, batch


def other(batch: Batch) -> Batch:
    """Another batch of the same form: float rows swapped, token ids shifted along the sequence."""

    def change(k: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.flip(0)
        return t if "mask" in k else t.roll(1, -1)

    if isinstance(batch, dict):
        return {k: change(k, v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(change("", t) for t in batch)
    return change("", batch)


def run_cell(
    arch: str, op: str, ref: torch.Tensor, tmp: str, timeout: int, group_size: int
) -> dict[str, Any]:
    cell: dict[str, Any] = {"arch": arch, "op": op, "stages": {}}
    model, batch = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flt0, params0, _ = weights(model)

    def op_limited() -> nn.Module:
        with time_limit(timeout):
            return run_op(op, model, batch, group_size)

    result = stage(cell, "op", op_limited)
    if result is None:
        error = str(cell["stages"]["op"].get("error", ""))
        if NOTHING_TO_DO.search(error) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()):
            # the verb said, naming the layers and why, that the operation has nothing to act on here
            cell["stages"]["op"]["ok"] = True
            cell["na"] = error[:300]
        return finish(cell)
    after = model.state_dict()

    def same_state() -> None:
        changed = sorted(set(before) ^ set(after)) or [
            k for k in before if not torch.equal(before[k], after[k])
        ]
        if changed:
            raise AssertionError(
                f"the caller's state dict changed: {changed[:3]} ({len(changed)} entries)"
            )

    stage(cell, "state", same_state)
    flt, params, zeros = weights(result)
    plan = getattr(result, "slimkit_plan", None)
    cell["float_weights_left"] = flt / max(flt0, 1)
    cell["params_left"] = params / max(params0, 1)
    cell["zeros"] = zeros / max(flt, 1)
    cell["training"] = result.training
    if plan is not None and hasattr(plan, "quantized_layers"):
        cell["quantized_layers"] = len(plan.quantized_layers)
        cell["skipped"] = dict(list(plan.skipped.items())[:6])
        if not plan.quantized_layers:
            why = "; ".join(sorted(set(plan.skipped.values()))) or "no Linear/Conv layers"
            cell["na"] = f"nothing quantized: {why[:300]}"
    elif op.startswith("prune") or op == "svd":
        if (
            op != "prune-unstructured"
            and params == params0
            or op == "prune-unstructured"
            and zeros == 0
        ):
            frozen = sorted({g.get("frozen", "") for g in getattr(plan, "groups_", [])} - {""})
            cell["na"] = "nothing removed" + (
                f" (kept whole: {'; '.join(frozen)[:200]})" if frozen else ""
            )
    out = stage(cell, "call", lambda: main_output(call(result, batch)))
    if out is not None:
        metrics = stage(cell, "call", lambda: compare(out, ref))
        cell.update(metrics or {})

    def save_load() -> None:
        path = Path(tmp) / f"{arch}-{op}"
        sk.save(result, path)
        loaded = sk.load(path, build(arch)[0])
        again = main_output(call(loaded, batch))
        if out is not None:
            diff = compare(again, out)["rel_l2"]
            cell["load_rel_l2"] = diff
            if diff > 1e-5:
                raise AssertionError(
                    f"loaded model's outputs differ from the saved one's (rel L2 {diff:.3g})"
                )

    stage(cell, "save/load", save_load)

    def export() -> None:
        report = sk.export_onnx(result, Path(tmp) / f"{arch}-{op}.onnx", batch)
        cell["onnx_rel_l2"], cell["onnx_tolerance"] = report.parity.rel_l2, report.parity.tolerance

    stage(cell, "export", export)
    if op.startswith("int8") and cell.get("cosine", 1.0) < SILENT_BELOW[op]:
        cell["peer_cosine"] = ort_dynamic_cosine(model, batch, Path(tmp) / f"{arch}-peer", ref)
    if op == "fp8" and cell.get("cosine", 1.0) < SILENT_BELOW[op]:
        cell["peer_cosine"] = ort_fp8_cosine(model, batch, Path(tmp) / f"{arch}-peer8", ref)
    return finish(cell)


def ort_fp8_cosine(model: nn.Module, batch: Batch, stem: Path, ref: torch.Tensor) -> float | None:
    """The FP8 peer: ONNX Runtime's ``quantize_static`` of the FP32 export to E4M3 weights (per channel) and
    activations (its float quantization takes the ``Distribution`` calibration only), on the same batch
    twice; cosine with PyTorch's FP32 output, run at the basic level (its later fusions mistreat FP8)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from slimkit.export.runtime import feeds, session

    try:
        sk.export_onnx(model, f"{stem}-fp32.onnx", batch)
        names = [i.name for i in session(f"{stem}-fp32.onnx").get_inputs()]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.left = 2

            def get_next(self) -> dict[str, Any] | None:
                self.left -= 1
                return feeds(session(f"{stem}-fp32.onnx"), batch, names) if self.left >= 0 else None

        quantize_static(f"{stem}-fp32.onnx", f"{stem}-q.onnx", Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QFLOAT8E4M3FN, weight_type=QuantType.QFLOAT8E4M3FN,
                        calibrate_method=CalibrationMethod.Distribution, per_channel=True)
        s = session(f"{stem}-q.onnx", level="basic")
        out = torch.from_numpy(s.run(None, feeds(s, batch, names))[0])
        return float(compare(out, ref)["cosine"])
    except Exception as e:  # noqa: BLE001 -- a peer that fails is recorded, not fatal
        log.info("FP8 peer failed: %s", e)
        return None


def ort_dynamic_cosine(model: nn.Module, batch: Batch, stem: Path, ref: torch.Tensor) -> float | None:
    """The peer's fidelity on the same model: ONNX Runtime's ``quantize_dynamic`` of the FP32 export
    (7-bit weights, ``reduce_range``, as slimkit's INT8 uses on CPUs without VNNI), cosine with
    PyTorch's FP32 output. A cell under the floor is silent only where slimkit is below the peer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slimkit.export.runtime import OrtModule

    try:
        sk.export_onnx(model, f"{stem}-fp32.onnx", batch)
        quantize_dynamic(f"{stem}-fp32.onnx", f"{stem}-q.onnx", weight_type=QuantType.QInt8, reduce_range=True,
                         op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        out = OrtModule(f"{stem}-q.onnx")
        got = out(**batch) if isinstance(batch, dict) else out(batch)
        return compare(main_output(got), ref)["cosine"]
    except Exception as e:  # the peer's failure is recorded as no peer number
        log.info("peer quantize_dynamic failed: %s", e)
        return None


def finish(cell: dict[str, Any]) -> dict[str, Any]:
    failed = next((s for s in STAGES if not cell["stages"].get(s, {"ok": True})["ok"]), None)
    cos, floor = cell.get("cosine"), SILENT_BELOW.get(cell["op"])
    # a deviation is recorded even where a later stage fails: the failure would hide it
    peer = cell.get("peer_cosine")
    cell["silent"] = cos is not None and (
        not math.isfinite(cos) or floor is not None and cos < floor and (peer is None or cos < peer - 0.02)
    )
    if failed:
        cell["status"], cell["failed_stage"] = "fail", failed
    elif "na" in cell:
        cell["status"] = "n/a"
    else:
        cell["status"] = "silent" if cell["silent"] else "ok"
    return cell


def worker(arch: str, ops: list[str], out: str, timeout: int, group_size: int) -> None:
    """One architecture's row, a JSON line per cell appended to ``out`` as it finishes."""
    torch.set_num_threads(2)
    model, batch = build(arch)
    ref = main_output(call(model, batch))
    sensitivity = 1 - compare(main_output(call(model, other(batch))), ref)["cosine"]
    with tempfile.TemporaryDirectory() as tmp, open(out, "a") as f:
        for op in ops:
            t = time.time()
            cell = run_cell(arch, op, ref, tmp, timeout, group_size)
            cell["seconds"], cell["input_sensitivity"] = round(time.time() - t, 2), sensitivity
            f.write(json.dumps(cell) + "\n")
            f.flush()


def run(archs: list[str], ops: list[str], timeout: int, group_size: int) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            out = f"{tmp}/{arch}.jsonl"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                arch,
                "--ops",
                ",".join(ops),
                "--timeout",
                str(timeout),
                "--group-size",
                str(group_size),
                "--out",
                out,
                *(["--no-cache"] if NO_CACHE else []),
            ]
            t = time.time()
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout * (len(ops) + 2)
                )
                tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            except subprocess.TimeoutExpired:
                tail = "the whole row ran over its time limit"
            done = (
                [json.loads(ln) for ln in Path(out).read_text().splitlines()]
                if Path(out).exists()
                else []
            )
            for op in ops[len(done) :]:
                done.append(
                    {
                        "arch": arch,
                        "op": op,
                        "status": "fail",
                        "failed_stage": "op",
                        "stages": {
                            "op": {
                                "ok": False,
                                "error": f"worker died: {tail[:300]}",
                                "slimkit": None,
                                "raised": None,
                            }
                        },
                    }
                )
            cells += done
            log.info(
                "%s: %s (%.0f s)",
                arch,
                " ".join(f"{c['op']}={c['status']}" for c in done),
                time.time() - t,
            )
    return {
        "archs": {a: ARCHS[a].family for a in archs},
        "ops": ops,
        "group_size": group_size,
        "timeout_s": timeout,
        "no_cache": NO_CACHE,
        "cells": cells,
    }


def label(c: dict[str, Any]) -> str:
    cos = f" {c['cosine']:.3f}" if c.get("cosine") is not None else ""
    if c["status"] == "fail":
        return f"**FAIL** {c['failed_stage']}" + (f" (**silent**{cos})" if c.get("silent") else "")
    if c["status"] == "n/a":
        return "n/a"
    mark = "†" if c["op"].startswith("int") and c.get("float_weights_left", 0) > 0.5 else ""
    return f"{'**silent**' if c['status'] == 'silent' else 'ok'}{mark}{cos}"


def causes(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures grouped by stage, slimkit origin, where the root cause was raised and its message
    (numbers and model class names folded), most cells first within each stage. A later stage of a
    cell failing with the same message is listed with the first (``also``), not apart."""
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for c in cells:
        first: dict[str, dict[str, Any]] = {}  # message -> its group, within this cell
        for name in STAGES:
            s = c["stages"].get(name)
            if not s or s["ok"]:
                continue
            msg = re.sub(r"\b\w+(Model|For\w+)\b", "<Model>", s.get("root") or s["error"])
            msg = re.sub(r"\d+", "N", msg)[:120]
            if msg in first:
                first[msg]["also"].add(name)
                continue
            key = (name, s.get("slimkit") or "-", s.get("raised") or "-", msg)
            g = groups.setdefault(
                key,
                {
                    "stage": name,
                    "slimkit": key[1],
                    "raised": key[2],
                    "also": set(),
                    "error": s["error"],
                    "root": s.get("root"),
                    "cells": [],
                },
            )
            g["cells"].append(f"{c['arch']}/{c['op']}")
            first[msg] = g
    return sorted(groups.values(), key=lambda g: (STAGES.index(g["stage"]), -len(g["cells"])))


def size(c: dict[str, Any]) -> str:
    """What the op left: float weights (quantize), zeros (unstructured), parameters (the others)."""
    if c["status"] in ("fail", "n/a") and "params_left" not in c:
        return "-"
    if c["op"].startswith("int"):
        return f"{c['float_weights_left']:.0%} float"
    if c["op"] == "prune-unstructured":
        return f"{c['zeros']:.0%} zeros"
    return f"{c['params_left']:.0%} params"


def markdown(res: dict[str, Any]) -> str:
    ops, by = res["ops"], {(c["arch"], c["op"]): c for c in res["cells"]}
    counts = {
        s: sum(c["status"] == s for c in res["cells"]) for s in ("ok", "fail", "silent", "n/a")
    }
    head = ["| arch | family | " + " | ".join(ops) + " |", "|---|---|" + "---|" * len(ops)]

    def table(cell: Callable[[dict[str, Any]], str]) -> list[str]:
        return head + [
            f"| {a} | {f} | "
            + " | ".join(cell(by[a, o]) if (a, o) in by else "-" for o in ops)
            + " |"
            for a, f in res["archs"].items()
        ]

    versions = ", ".join(f"{k} {res[k]}" for k in ("torch", "transformers", "onnxruntime"))
    setup = (
        f"{len(res['archs'])} tiny random-weight architectures (`slimkit.zoo.archs`) x {len(ops)} "
        f"operations, int4 presets with group_size {res['group_size'] or 128}"
        + (", use_cache=False" if res.get("no_cache") else "")
    )
    m = [
        f"# arch_coverage: every verb on every architecture ({res['machine']})",
        "",
        f"{versions}; {setup}. Cell: status and the cosine of the main output with the float "
        "model's; `FAIL stage` names the first failing stage (op, state, call, save/load, export; "
        "every stage runs regardless; `(silent c)`: a deviation that the failure hides); "
        "† = more than half the weights left in float. "
        f"{counts['ok']} ok, {counts['fail']} fail, {counts['silent']} silent, {counts['n/a']} n/a "
        f"({res['seconds']:.0f} s).",
        "",
        *table(label),
        "",
        "## Failures by cause",
        "",
        "Each: the stage, the deepest slimkit frame, where the root cause was raised, the error "
        "(and its root cause), the cells.",
        "",
    ]
    for g in causes(res["cells"]):
        root = f" <- `{g['root']}`" if g["root"] else ""
        also = f" (then also {', '.join(sorted(g['also'], key=STAGES.index))})" if g["also"] else ""
        where = f"at `{g['slimkit']}`, raised at `{g['raised']}`"
        cells = f"{len(g['cells'])}: {', '.join(g['cells'])}"
        m.append(f"- **{g['stage']}**{also} {where}: `{g['error']}`{root} -- {cells}")
    na = [c for c in res["cells"] if c["status"] == "n/a"]
    if na:
        m += ["", "## Not applicable", ""] + [f"- {c['arch']}/{c['op']}: {c['na']}" for c in na]
    m += ["", "## What each op left", "", *table(size)]
    flat = sorted({c["arch"] for c in res["cells"] if c.get("input_sensitivity", 1) < 1e-3})
    silent = [f"{c['arch']}/{c['op']} ({c['cosine']:.3f})" for c in res["cells"] if c.get("silent")]
    if silent:
        m += [
            "",
            "Outputs below the cosine floor (0.9 at 8 bits, 0.8 at 4) and the peer's, failing or not: "
            f"{', '.join(silent)}.",
        ]
    noisy = [f"{c['arch']}/{c['op']} ({c['cosine']:.3f}; ONNX Runtime's quantize_dynamic {c['peer_cosine']:.3f})"
             for c in res["cells"] if c.get("peer_cosine") is not None and not c.get("silent")]
    if noisy:
        m += [
            "",
            "Under the floor, but no further from FP32 than ONNX Runtime's own dynamic INT8 of the same model "
            f"(7-bit weights, reduce_range) in this run, so the rounding noise of these random weights: {', '.join(noisy)}.",
        ]
    if flat:
        m += [
            "",
            "Outputs that hardly depend on the input (1 - cosine between two batches < 1e-3), "
            f"so their cosines say little: {', '.join(flat)}.",
        ]
    return "\n".join(m) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--archs", default=",".join(ARCHS), help="comma-separated subset of slimkit.zoo.archs"
    )
    ap.add_argument(
        "--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}"
    )
    ap.add_argument("--timeout", type=int, default=300, help="seconds per operation")
    ap.add_argument(
        "--group-size", type=int, default=32, help="int4 group size (0: the presets' 128)"
    )
    ap.add_argument(
        "--no-cache", action="store_true", help="use_cache=False on models with a config"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global NO_CACHE
    NO_CACHE = args.no_cache
    archs, ops = args.archs.split(","), args.ops.split(",")
    unknown = sorted(set(archs) - set(ARCHS)) + sorted(set(ops) - set(OPS))
    if unknown:
        ap.error(f"unknown arch or op: {', '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("slimkit").setLevel(logging.WARNING)
    if args.worker:
        return worker(args.worker, ops, args.out, args.timeout, args.group_size)
    import onnxruntime as ort
    import transformers

    t = time.time()
    res = {
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": ort.__version__,
        **run(archs, ops, args.timeout, args.group_size),
    }
    res["seconds"] = time.time() - t
    subset = archs != list(ARCHS) or ops != OPS or args.no_cache
    write_results(
        "arch_coverage" + ("_no_cache" if args.no_cache else ""), res, markdown, quick=subset
    )


if __name__ == "__main__":
    main()
