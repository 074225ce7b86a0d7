"""The command line: ``slimkit run`` (a recipe), ``demo``, ``quantize``, ``prune``, ``factorize``,
``distill``, ``bench``, ``lint``, ``report``, ``presets``.

Exit codes: 0 success; 1 the work failed (an evaluation function that raised, a parity failure, a
lint that found problems); 2 bad usage or bad input (the message names the file, line or key);
130 interrupted (``slimkit run`` resumes when run again).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXAMPLES = """examples:
  slimkit run examples/digits_recipe.yaml          # prune, distill, quantize; resumes if interrupted
  slimkit run examples/digits_tune.yaml            # the tuner: fastest within 1 point of FP32
  slimkit demo --out out/demo
  slimkit bench out/demo/fp32.onnx out/demo/slimkit_int8.onnx --data digits
  slimkit lint out/demo/slimkit_int8.onnx
  slimkit report out/recipe
  slimkit distill slimkit.zoo:digits_model --factory-arg mlp --teacher slimkit.zoo:trained \\
      --teacher-arg resnet18 --epochs 5 --out out/d
  slimkit presets
  slimkit quantize slimkit.zoo:digits_model --factory-arg resnet18 --checkpoint w.safetensors \\
      --preset int8 --calib digits --out out/q
  slimkit factorize slimkit.zoo:trained --factory-arg resnet18 --method tucker --ratio 0.5 \\
      --finetune 3 --out out/f
  slimkit prune slimkit.zoo:trained --factory-arg resnet18 --sparsity 0.5 --round-to 8 --finetune 3 --out out/p
"""


def _load_factory(spec: str) -> Any:
    if ":" not in spec:
        raise ValueError(f"model must be given as package.module:factory, got {spec!r}")
    mod, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec!r}: {e}") from e


def _cmd_demo(args: argparse.Namespace) -> int:
    from slimkit.demo import markdown_table, run_demo

    result = run_demo(args.out, args.model, tune_budget=args.tune_budget)
    sys.stdout.write(markdown_table(result))
    tuner = result["tuner"]
    sys.stdout.write(f"\nthe tuner (within {tuner['max_drop']:g} point of FP32 accuracy, {args.tune_budget:g} s) picked "
                     f"{tuner['best']['label']}: {tuner['stopped']}\n")
    sys.stdout.write(f"written: {args.out}/results.json, {args.out}/results.md and the ONNX files\n"
                     f"report: {Path(args.out).resolve() / 'report.html'}\n")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    import slimkit as sk

    sys.stdout.write(json.dumps(sk.presets(), indent=1) + "\n")
    return 0


def _load_model(args: argparse.Namespace) -> Any:
    from safetensors.torch import load_file

    factory = _load_factory(args.model)
    model = factory(*args.factory_arg)
    if args.checkpoint:
        model.load_state_dict(load_file(args.checkpoint))
    return model.eval()


def _digits(name: str, flag: str) -> Any:
    if name != "digits":
        raise ValueError(f"{flag} supports 'digits' (the bundled data), got {name!r}")
    from slimkit.data import load_digits32

    return load_digits32()


def _cmd_quantize(args: argparse.Namespace) -> int:
    import slimkit as sk
    from slimkit.data import batches

    model = _load_model(args)
    d = _digits(args.calib, "--calib")
    q = sk.quantize(model, args.preset, calib_data=batches(d.train_x[:256], None, 32))
    sk.save(q, args.out)
    report = sk.export_onnx(q, f"{args.out}/model.onnx", d.test_x[:8])
    sys.stdout.write(f"saved {args.out}; ONNX parity: {report.parity}\n")
    return 0


def _cmd_factorize(args: argparse.Namespace) -> int:
    import slimkit as sk
    from slimkit.data import batches
    from slimkit.train import accuracy

    cfg: dict[str, object] = {"method": args.method, "allocation": args.allocation, "iterations": args.iterations,
                              "whiten": args.whiten}
    for key in ("rank", "energy", "ratio"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.layers:
        cfg["layers"] = _names(args.layers)
    config = sk.FactorizeConfig.from_dict(cfg)  # validated before any work
    model, d = _model_and_data(args)
    x = d.train_x
    f = sk.factorize(model, config, data=batches(x[:256], None, 64) if args.allocation == "global" or args.whiten else None)
    plan: Any = f.slimkit_plan
    sys.stdout.write(plan.summary() + "\n")
    line = f"accuracy on digits: original {accuracy(model, d.test_x, d.test_y):.2f}%, factorized "
    return _finish(args, model, f, d, line)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _model_and_data(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.finetune < 0:
        raise ValueError(f"--finetune is a number of epochs, at least 0, got {args.finetune}")
    return _load_model(args), _digits(args.data, "--data")


def _finish(args: argparse.Namespace, model: Any, compressed: Any, d: Any, line: str, hold: bool = False) -> int:
    """Report accuracy, fine-tune with distillation (``--finetune``), save, export and check in ONNX Runtime."""
    import contextlib

    import slimkit as sk
    from slimkit.data import batches
    from slimkit.prune.masks import hold_zeros
    from slimkit.train import accuracy, fit

    tx, ty = d.test_x, d.test_y
    line += f"{accuracy(compressed, tx, ty):.2f}%"
    if args.finetune:
        with hold_zeros(compressed) if hold else contextlib.nullcontext():
            fit(compressed, batches(d.train_x, d.train_y, 32), epochs=args.finetune, lr=args.lr, teacher=model)
        line += f", after {args.finetune} epochs of fine-tuning with distillation {accuracy(compressed, tx, ty):.2f}%"
    sk.save(compressed, args.out)
    report = sk.export_onnx(compressed, f"{args.out}/model.onnx", tx[:8])
    sys.stdout.write(f"{line}\nsaved {args.out}; ONNX parity: {report.parity}\n")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    import slimkit as sk
    from slimkit.data import batches
    from slimkit.train import accuracy

    cfg: dict[str, object] = {"method": args.method, "sparsity": args.sparsity, "importance": args.importance,
                              "scope": args.scope, "round_to": args.round_to}
    if args.exclude:
        cfg["exclude"] = _names(args.exclude)
    config = sk.PruneConfig.from_dict(cfg)  # validated before any work
    model, d = _model_and_data(args)
    x, y, tx, ty = d.train_x, d.train_y, d.test_x, d.test_y
    p = sk.prune(model, config, example_inputs=tx[:2], data=batches(x[:512], y[:512], 64))
    plan: Any = p.slimkit_plan
    sys.stdout.write(plan.summary() + "\n")
    n0, n1 = (sum(t.numel() for t in m.parameters()) for m in (model, p))
    line = f"parameters {n0} -> {n1} ({n1 / n0:.1%}); accuracy on digits: original {accuracy(model, tx, ty):.2f}%, pruned "
    return _finish(args, model, p, d, line, hold=config.method != "structured")


def _cmd_run(args: argparse.Namespace) -> int:
    from slimkit.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, out=args.out)  # every key and import checked before any work
    results = run_recipe(recipe)
    from slimkit.report import markdown

    sys.stdout.write(markdown({**results, "layers": []}))
    sys.stdout.write(f"\nwritten: {recipe.out}/results.json, {recipe.out}/report.md, {recipe.out}/report.html\n")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    import slimkit as sk
    from slimkit.data import batches

    cfg = sk.DistillConfig.from_dict({"epochs": args.epochs, "lr": args.lr, "temperature": args.temperature,
                                      "alpha": args.alpha})
    student = _load_model(args)
    teacher = _load_factory(args.teacher)(*args.teacher_arg)
    if args.teacher_checkpoint:
        from safetensors.torch import load_file

        teacher.load_state_dict(load_file(args.teacher_checkpoint))
    d = _digits(args.data, "--data")
    s = sk.distill(student, teacher.eval(), batches(d.train_x, d.train_y, 32), cfg)
    from slimkit.train import accuracy

    n_s, n_t = (sum(p.numel() for p in m.parameters()) for m in (s, teacher))
    line = (f"teacher {n_t} parameters, {accuracy(teacher, d.test_x, d.test_y):.2f}%; "
            f"student {n_s} parameters, ")
    args.finetune = 0
    return _finish(args, teacher, s, d, line)


def _bench_inputs(args: argparse.Namespace) -> Any:
    import torch

    if args.data:
        return _digits(args.data, "--data").test_x
    if not args.input_shape:
        raise ValueError("give --data digits or --input-shape (e.g. 8,3,224,224) for the inputs")
    try:
        shape = [int(v) for v in args.input_shape.split(",")]
    except ValueError as e:
        raise ValueError(f"--input-shape is comma-separated integers, got {args.input_shape!r}") from e
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    import numpy as np

    from slimkit.export.runtime import measure_latency, session

    for f in args.files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f} does not exist")
    x = _bench_inputs(args)
    ref_path = args.reference or args.files[0]
    ref_sess = session(ref_path)
    ref = ref_sess.run(None, {ref_sess.get_inputs()[0].name: x.numpy()})[0]
    rows = []
    for f in args.files:
        sess = session(f, args.threads)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ValueError(f"{f} gives outputs of shape {got.shape}, the reference {ref_path} {ref.shape}")
        lat = measure_latency(f, x[: args.batch], threads=args.threads, runs=args.runs, min_seconds=1.0)
        row: dict[str, Any] = {"file": f, "size_kb": os.path.getsize(f) / 1e3, "latency_ms": lat["median_ms"],
               "rel_l2": float(np.linalg.norm(got - ref)) / max(float(np.linalg.norm(ref)), 1e-30)}
        if ref.ndim == 2 and ref.shape[1] > 1:
            row["top1_agreement"] = float(100 * np.mean(got.argmax(1) == ref.argmax(1)))
        rows.append(row)
    base: dict[str, Any] = next((r for r in rows if r["file"] == ref_path), rows[0])
    lines = [f"reference: {ref_path}; batch {args.batch}, {args.threads} threads, median latency", "",
             "| file | size kB | size vs ref | latency ms | latency vs ref | rel. L2 vs ref | top-1 agreement % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = f"{r['top1_agreement']:.1f}" if "top1_agreement" in r else "-"
        lines.append(f"| {r['file']} | {r['size_kb']:.0f} | {r['size_kb'] / base['size_kb']:.3f}x | {r['latency_ms']:.3f} | "
                     f"{r['latency_ms'] / base['latency_ms']:.2f}x | {r['rel_l2']:.2e} | {agree} |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _cmd_lint(args: argparse.Namespace) -> int:
    import os

    from slimkit.export import lint

    if not os.path.exists(args.file):
        raise FileNotFoundError(f"{args.file} does not exist")
    report = lint(args.file)
    sys.stdout.write(json.dumps(report.to_dict(), indent=1) + "\n")
    return 0 if report.ok else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from slimkit.report import write_report

    paths = write_report(args.folder)
    sys.stdout.write(f"written: {paths['md']}, {paths['html']}\n")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="package.module:factory")
    p.add_argument("--factory-arg", action="append", default=[])
    p.add_argument("--checkpoint", help="a .safetensors state dict")


def _finish_args(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--data", default="digits", help=data_help)
    p.add_argument("--finetune", type=int, default=0, help="epochs of fine-tuning with distillation from the original")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", required=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimkit", description="Make trained PyTorch models smaller and faster.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="the whole story on the bundled digits: FP32, INT8 and ONNX Runtime's quantizer, "
                       "prune + distill, the tuner's pick, and the report")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--tune-budget", type=float, default=120.0, help="seconds the tuner may spend")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "mobilenet_v2", "mlp"])
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("run", help="run (or resume) a YAML recipe of stages", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--out", help="output folder (default: the recipe's out)")
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("distill", help="train a student given as package.module:factory from a teacher, on digits")
    _model_args(p)
    p.add_argument("--teacher", required=True, help="package.module:factory")
    p.add_argument("--teacher-arg", action="append", default=[])
    p.add_argument("--teacher-checkpoint", help="a .safetensors state dict")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--data", default="digits", help="training data")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_cmd_distill)
    p = sub.add_parser("bench", help="latency, size and fidelity of ONNX files against a reference")
    p.add_argument("files", nargs="+")
    p.add_argument("--reference", help="the file the others are compared with (default: the first)")
    p.add_argument("--data", help="'digits': the bundled test images as inputs")
    p.add_argument("--input-shape", help="random inputs of this shape, e.g. 8,3,224,224")
    p.add_argument("--batch", type=int, default=1, help="batch size of the latency runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(fn=_cmd_bench)
    p = sub.add_parser("lint", help="Q/DQ pairs left unfused and float ops left in a quantized ONNX file "
                       "(exit 1 when it finds any)")
    p.add_argument("file")
    p.set_defaults(fn=_cmd_lint)
    p = sub.add_parser("report", help="write report.md and report.html from a run folder's results.json")
    p.add_argument("folder")
    p.set_defaults(fn=_cmd_report)
    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(fn=_cmd_presets)
    p = sub.add_parser("quantize", help="quantize a model given as package.module:factory")
    _model_args(p)
    p.add_argument("--preset", default="int8")
    p.add_argument("--calib", default="digits")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_cmd_quantize)
    p = sub.add_parser("factorize", help="low-rank decomposition of a model given as package.module:factory")
    _model_args(p)
    p.add_argument("--method", default="svd", choices=["svd", "spatial-svd", "tucker", "cp"])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int)
    g.add_argument("--energy", type=float, help="fraction of the squared singular values kept")
    g.add_argument("--ratio", type=float, help="fraction of the weights kept")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    p.add_argument("--layers", help="comma-separated module names (default: every layer the method takes)")
    p.add_argument("--iterations", type=int, default=25, help="HOOI or ALS sweeps")
    p.add_argument("--whiten", action="store_true", help="data-whitened SVD (svd only; uses --data)")
    _finish_args(p, "data for sensitivity, whitening and fine-tuning")
    p.set_defaults(fn=_cmd_factorize)
    p = sub.add_parser("prune", help="prune a model given as package.module:factory (digits data for scores and fine-tuning)")
    _model_args(p)
    p.add_argument("--method", default="structured", choices=["structured", "unstructured", "nm"])
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction removed")
    p.add_argument("--importance", default="l1", choices=["l1", "l2", "taylor"])
    p.add_argument("--scope", default=None, choices=["global", "layer"],
                   help="structured: one threshold over all groups (global) or the same fraction in each (default); "
                        "unstructured: global (default) or per layer")
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this")
    p.add_argument("--exclude", help="comma-separated module names to leave whole")
    _finish_args(p, "data for scores, BatchNorm statistics and fine-tuning")
    p.set_defaults(fn=_cmd_prune)
    for name, p in sub.choices.items():  # every subcommand's --help ends with its example from EXAMPLES
        lines = EXAMPLES.splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith(f"slimkit {name} ") or line.strip() == f"slimkit {name}":
                block = [line]
                while block[-1].rstrip().endswith("\\") and i + len(block) < len(lines):
                    block.append(lines[i + len(block)])
                p.epilog = "example:\n" + "\n".join(block)
                p.formatter_class = argparse.RawDescriptionHelpFormatter
                break
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # ONNX Runtime's quantizer (a peer) advises on the root logger
        handler.addFilter(lambda record: not str(record.msg).startswith("Please consider"))
    try:
        return int(args.fn(args))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.stderr.write(f"slimkit: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("slimkit: interrupted" + ("; run the same command again to resume\n" if args.cmd == "run" else "\n"))
        return 130
    except RuntimeError as e:
        sys.stderr.write(f"slimkit: failed: {e}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
