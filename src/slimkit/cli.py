"""The command line: ``slimkit demo``, ``slimkit quantize``, ``slimkit presets``.

Exit codes: 0 success, 1 failure in the work, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

EXAMPLES = """examples:
  slimkit demo --out out/demo
  slimkit presets
  slimkit quantize slimkit.zoo:digits_model --factory-arg resnet18 --checkpoint w.safetensors \\
      --preset int8 --calib digits --out out/q
"""


def _load_factory(spec: str) -> object:
    if ":" not in spec:
        raise ValueError(f"model must be given as package.module:factory, got {spec!r}")
    mod, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec!r}: {e}") from e


def _cmd_demo(args: argparse.Namespace) -> int:
    from slimkit.demo import markdown_table, run_demo

    result = run_demo(args.out, args.model)
    sys.stdout.write(markdown_table(result))
    sys.stdout.write(f"\nwritten: {args.out}/results.md, {args.out}/results.json and the ONNX files\n")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    import slimkit as sk

    sys.stdout.write(json.dumps(sk.presets(), indent=1) + "\n")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    import slimkit as sk

    factory = _load_factory(args.model)
    model = factory(*args.factory_arg)  # type: ignore[operator]
    if args.checkpoint:
        model.load_state_dict(load_file(args.checkpoint))
    model.eval()
    if args.calib != "digits":
        raise ValueError(f"--calib supports 'digits' (the bundled data), got {args.calib!r}")
    from slimkit.data import batches, load_digits32

    d = load_digits32()
    q = sk.quantize(model, args.preset, calib_data=batches(d.train_x[:256], None, 32))
    sk.save(q, args.out)
    report = sk.export_onnx(q, f"{args.out}/model.onnx", d.test_x[:8])
    sys.stdout.write(f"saved {args.out}; ONNX parity: {report.parity}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimkit", description="Make trained PyTorch models smaller and faster.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="quantize a digits CNN and compare with FP32 and ONNX Runtime's quantizer")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "mobilenet_v2", "mlp"])
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(fn=_cmd_presets)
    p = sub.add_parser("quantize", help="quantize a model given as package.module:factory")
    p.add_argument("model")
    p.add_argument("--factory-arg", action="append", default=[])
    p.add_argument("--checkpoint", help="a .safetensors state dict")
    p.add_argument("--preset", default="int8")
    p.add_argument("--calib", default="digits")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_cmd_quantize)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.stderr.write(f"slimkit: error: {e}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
