"""The commands around the verbs: ``run`` (a recipe), ``demo``, ``bench``, ``lint``, ``report``,
``presets``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_tools", "onnx_session", "onnx_feeds"]

log = logging.getLogger("slimkit.cli")

_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
             "tensor(bool)": "bool"}


class _LiteRTSession:
    """ONNX Runtime's session interface (``get_inputs``, ``run``) on a ``.tflite`` file in LiteRT."""

    def __init__(self, path: str, threads: int) -> None:
        from types import SimpleNamespace

        from slimkit.export.runtimes import _LiteRT, open_file

        runner = open_file(path, "litert", threads)
        assert isinstance(runner, _LiteRT)
        self.runner = runner
        types = {v: k for k, v in _NP_TYPES.items()}
        self.inputs = [SimpleNamespace(name=d["name"], type=types.get(d["dtype"].__name__, "tensor(float)"),
                                       shape=["batch" if k == 0 and n == -1 else int(n)
                                              for k, n in enumerate(d["shape_signature"])]) for d in runner.inputs]

    def get_inputs(self) -> list[Any]:
        return self.inputs

    def run(self, _outputs: Any, feeds: dict[str, Any]) -> list[Any]:
        return self.runner.run(feeds)


def onnx_session(path: str, threads: int = 2) -> Any:
    """An ONNX Runtime session (for a ``.tflite`` file, LiteRT's interpreter behind the same
    interface); a missing, corrupt or non-ONNX file is a ``ValueError`` naming it."""
    from slimkit.export.runtime import session

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give the .onnx file in it")
    if path.endswith(".tflite"):
        return _LiteRTSession(path, threads)
    try:
        return session(path, threads)
    except Exception as e:  # onnxruntime's InvalidProtobuf, InvalidGraph, Fail: not ValueErrors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not an ONNX model ONNX Runtime can load ({first[:200]}); "
                         "give a file written by sk.export_onnx or another exporter") from e


def _random_feeds(sess: Any, batch: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else 16) for k, d in enumerate(i.shape)]
        dtype = _NP_TYPES.get(i.type, "float32")
        if dtype.startswith("float"):
            out[i.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == "bool" or "mask" in i.name:
            out[i.name] = np.ones(dims, dtype=dtype)
        else:
            out[i.name] = rng.integers(0, 100, dims).astype(dtype)
    return out


def onnx_feeds(sess: Any, batch: Any, path: str) -> dict[str, Any]:
    """The feeds of ``sess`` from a batch as the PyTorch model took it (a tensor, a tuple in the
    file's input order, or a dict by name), cast to the file's input types."""
    import numpy as np

    from slimkit.core.batch import tensors_of

    inputs = sess.get_inputs()
    if isinstance(batch, dict):
        missing = [i.name for i in inputs if i.name not in batch]
        if missing:
            raise ValueError(f"{path} takes inputs {[i.name for i in inputs]}; the data has no {missing}")
        arrays = [batch[i.name] for i in inputs]
    else:
        arrays = tensors_of(batch)
        if len(arrays) != len(inputs):
            raise ValueError(f"{path} takes {len(inputs)} inputs {[i.name for i in inputs]}; the data gives {len(arrays)}")
    out = {}
    for i, a in zip(inputs, arrays, strict=True):
        arr = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        out[i.name] = arr.astype(_NP_TYPES.get(i.type, str(arr.dtype)), copy=False)
        fixed = [d for d in i.shape]
        if len(fixed) != arr.ndim or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(fixed, arr.shape, strict=False)):
            raise ValueError(f"{path}: input {i.name!r} has shape {fixed} (strings are free axes); the data gives "
                             f"{list(arr.shape)}")
    return out


def _run(sess: Any, feeds: dict[str, Any], path: str) -> Any:
    try:
        return sess.run(None, feeds)[0]
    except Exception as e:  # onnxruntime's InvalidArgument (shapes, types): not a ValueError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: ONNX Runtime refused the inputs ({first[:300]})") from e


def _bench_feeds(args: argparse.Namespace, sess: Any, path: str) -> dict[str, Any]:
    import numpy as np

    if args.data:
        from slimkit.cli.verbs import _image_size
        from slimkit.data.sources import load_data

        data = load_data(args.data, batch_size=args.samples, model_folder=args.tokenizer,
                         image_size=_image_size(args.image_size), max_length=args.max_length, split="test",
                         limit=args.samples)
        return onnx_feeds(sess, data.inputs[0], path)
    if args.input_shape:
        try:
            shape = [int(v) for v in args.input_shape.split(",")]
        except ValueError as e:
            raise ValueError(f"--input-shape is comma-separated integers, got {args.input_shape!r}") from e
        first = sess.get_inputs()[0]
        log.warning("bench: random inputs of shape %s: the fidelity columns say nothing about real data; give --data",
                    shape)
        feeds = _random_feeds(sess, shape[0])
        feeds[first.name] = np.random.default_rng(0).standard_normal(shape).astype(_NP_TYPES.get(first.type, "float32"))
        onnx_feeds(sess, {k: v for k, v in feeds.items()}, path)  # the shape checked against the file's
        return feeds
    feeds = _random_feeds(sess, 8)
    log.warning("bench: no --data, so random inputs of the file's own shapes (%s): the fidelity columns say nothing "
                "about real data", ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items()))
    return feeds


def _cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np

    from slimkit.export.runtime import measure_latency

    tflite = [f for f in args.files + ([args.reference] if args.reference else []) if f.endswith(".tflite")]
    if tflite and (args.runtime != "litert" or len(tflite) != len(args.files) + bool(args.reference)):
        raise ValueError(f"{tflite[0]} is a TFLite file: bench .tflite files together, with --runtime litert")
    for f in args.files:
        onnx_session(f, 1)  # every file checked before any timing
    ref_path = args.reference or args.files[0]
    ref_sess = onnx_session(ref_path, args.threads)
    feeds = _bench_feeds(args, ref_sess, ref_path)
    ref = _run(ref_sess, feeds, ref_path)
    rows = []
    other = args.runtime != "onnxruntime"
    if other:  # the reference's outputs from ONNX Runtime; each file's from the runtime asked for
        from slimkit.export.runtimes import compare_runtime_latency, open_file

        runners = {f: open_file(f, args.runtime, args.threads) for f in args.files}
        small_feeds = [{k: np.ascontiguousarray(v[: args.batch]) for k, v in onnx_feeds(onnx_session(f, 1), feeds, f).items()}
                       for f in args.files]
        lats = compare_runtime_latency(args.files, small_feeds, args.runtime, args.threads, rounds=5, seconds=0.5)
    for i, f in enumerate(args.files):
        sess = onnx_session(f, args.threads)
        given = onnx_feeds(sess, feeds, f)
        got = runners[f].run(given)[0] if other else _run(sess, given, f)
        if got.shape != ref.shape:
            raise ValueError(f"{f} gives outputs of shape {list(got.shape)}, the reference {ref_path} {list(ref.shape)}")
        import torch

        small = {k: torch.from_numpy(np.ascontiguousarray(v[: args.batch])) for k, v in feeds.items()}
        lat = lats[i] if other else measure_latency(f, small, threads=args.threads, runs=args.runs, min_seconds=1.0)
        row: dict[str, Any] = {"file": f, "size_kb": os.path.getsize(f) / 1e3, "latency_ms": lat["median_ms"],
                               "rel_l2": float(np.linalg.norm(got - ref)) / max(float(np.linalg.norm(ref)), 1e-30)}
        if ref.ndim == 2 and ref.shape[1] > 1:
            row["top1_agreement"] = float(100 * np.mean(got.argmax(1) == ref.argmax(1)))
        rows.append(row)
    base: dict[str, Any] = next((r for r in rows if r["file"] == ref_path), rows[0])
    where = "" if not other else f"; run in {args.runtime} (the reference's outputs from ONNX Runtime; latency in interleaved rounds)"
    lines = [f"reference: {ref_path}; batch {args.batch}, {args.threads} threads, median latency{where}", "",
             "| file | size kB | size vs ref | latency ms | latency vs ref | rel. L2 vs ref | top-1 agreement % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = f"{r['top1_agreement']:.1f}" if "top1_agreement" in r else "-"
        lines.append(f"| {r['file']} | {r['size_kb']:.0f} | {r['size_kb'] / base['size_kb']:.3f}x | {r['latency_ms']:.3f} | "
                     f"{r['latency_ms'] / base['latency_ms']:.2f}x | {r['rel_l2']:.2e} | {agree} |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        from slimkit.core.files import write_json

        write_json(args.json, rows)
    return 0


def _cmd_lint(args: argparse.Namespace) -> int:
    from slimkit.export import lint

    onnx_session(args.file, 1)  # missing, corrupt, not ONNX: exit 2 with the file named
    report = lint(args.file, args.target)
    sys.stdout.write(json.dumps(report.to_dict(), indent=1) + "\n")
    return 0 if report.ok else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from slimkit.report import write_report

    paths = write_report(args.folder)
    sys.stdout.write(f"written: {paths['md']}, {paths['html']}\n")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    import slimkit as sk
    from slimkit.verbs import DESCRIPTIONS
    from slimkit.verbs import PRESET_TABLES as VERBS

    verbs = [args.verb] if args.verb else list(VERBS)
    if args.verb and args.verb not in VERBS:
        raise ValueError(f"presets are listed per verb: one of {', '.join(VERBS)}; got {args.verb!r}")
    if args.json:
        got = {v: sk.presets(v) for v in verbs}
        sys.stdout.write(json.dumps(got[args.verb] if args.verb else got, indent=1) + "\n")
        return 0
    lines = []
    for v in verbs:
        names = sorted(VERBS[v][1])
        width = max(len(n) for n in names)
        lines.append(f"{v}:" if not args.verb else "")
        lines += [f"  {n:<{width}}  {DESCRIPTIONS[v][n]}" for n in names]
    sys.stdout.write("\n".join(t for t in lines if t) + "\n")
    return 0


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


def _cmd_run(args: argparse.Namespace) -> int:
    from slimkit.recipe import load_recipe, run_recipe
    from slimkit.report import markdown

    recipe = load_recipe(args.recipe, out=args.out)  # every key and import checked before any work
    results = run_recipe(recipe)
    sys.stdout.write(markdown({**results, "layers": []}))
    sys.stdout.write(f"\nwritten: {recipe.out}/results.json, {recipe.out}/report.md, {recipe.out}/report.html\n")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from slimkit.export.generator import Generator

    g = Generator(args.model, tokenizer=args.tokenizer, threads=args.threads)
    if args.prompt is None and args.prompt_ids is None:
        raise ValueError("give --prompt TEXT (with --tokenizer) or --prompt-ids 1,2,3")
    prompt: Any = args.prompt if args.prompt is not None else [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    stream = sys.stdout.isatty() if args.stream is None else args.stream

    def show(token: int, piece: str | None) -> None:
        sys.stdout.write(piece if piece is not None else f"{token} ")
        sys.stdout.flush()

    out = g.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or (),
                     on_token=show if stream else None)
    if not stream:
        sys.stdout.write(out.text if out.text is not None else " ".join(map(str, out.tokens)))
    sys.stdout.write("\n")
    sys.stderr.write(f"{len(out.tokens)} tokens ({out.stopped_by}); first token {1e3 * out.seconds_to_first_token:.1f} ms "
                     f"for {out.prompt_tokens} prompt tokens; {out.tokens_per_second:.1f} tokens/s after it\n")
    return 0


def add_tools(sub: Any) -> None:
    p = sub.add_parser("demo", help="the whole story on the bundled digits: FP32, INT8 and ONNX Runtime's quantizer, "
                       "prune + distill, the tuner's pick, and the report")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--tune-budget", type=float, default=120.0, help="seconds the tuner may spend")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "mobilenet_v2", "mlp"])
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("run", help="run (or resume) a YAML recipe of stages")
    p.add_argument("recipe")
    p.add_argument("--out", help="output folder (default: the recipe's out)")
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("bench", help="latency, size and fidelity of ONNX files against a reference, on your inputs")
    p.add_argument("files", nargs="+")
    p.add_argument("--reference", help="the file the others are compared with (default: the first)")
    p.add_argument("--data", help="the inputs, as the verbs take them (a .npy/.npz/.pt/.safetensors file, a folder of "
                   "images, package.module:function, 'digits'); without it, random inputs of the file's own shapes, "
                   "with a warning")
    p.add_argument("--samples", type=int, default=256, help="samples of --data compared (default 256)")
    p.add_argument("--image-size", help="resize a folder's images to H,W")
    p.add_argument("--tokenizer", help="a Hugging Face model folder whose tokenizer reads a text file given as --data")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text line (text data)")
    p.add_argument("--input-shape", help="random inputs of this shape for the first input, e.g. 8,3,224,224")
    p.add_argument("--batch", type=int, default=1, help="batch size of the latency runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino", "tvm", "litert"],
                   help="the runtime the files run and are timed in (openvino, tvm, litert: when installed; litert "
                   "takes .tflite files)")
    p.set_defaults(fn=_cmd_bench)
    p = sub.add_parser("generate", help="generate text with a file export_onnx(..., generative=True) wrote")
    p.add_argument("model", help="the .onnx file, or its folder (with genai_config.json)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer folder (text in and out); without it, token ids")
    p.add_argument("--prompt", help="the prompt text (needs --tokenizer)")
    p.add_argument("--prompt-ids", help="the prompt as token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens holding this mass")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop when the text holds this string (repeatable)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print each token as it comes (default: on a terminal)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(fn=_cmd_generate)
    p = sub.add_parser("lint", help="Q/DQ pairs left unfused and float ops left in a quantized ONNX file "
                       "(exit 1 when it finds any)")
    p.add_argument("file")
    p.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "openvino", "tvm", "tensorrt"],
                   help="the runtime's rules the file is checked against (default onnxruntime)")
    p.set_defaults(fn=_cmd_lint)
    p = sub.add_parser("report", help="write report.md and report.html from a run folder's results.json")
    p.add_argument("folder")
    p.set_defaults(fn=_cmd_report)
    p = sub.add_parser("presets", help="the named presets, one line each (VERB: quantize, qat, prune, factorize, distill)")
    p.add_argument("verb", nargs="?", help="only this verb's presets")
    p.add_argument("--json", action="store_true", help="the configs themselves, as JSON")
    p.set_defaults(fn=_cmd_presets)
