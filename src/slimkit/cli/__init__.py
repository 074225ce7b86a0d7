"""The command line: ``slimkit run`` (a recipe), ``demo``, ``quantize``, ``qat``, ``prune``,
``factorize``, ``distill`` (each on your model and data), ``bench``, ``lint``, ``report``, ``presets``.

Exit codes: 0 success; 1 the work failed (an evaluation function that raised, a parity failure, a
lint that found problems); 2 bad usage or bad input (one line naming the file, flag or key at
fault); 130 interrupted (``slimkit run`` resumes when run again).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "EXAMPLES"]

EXAMPLES = """examples:
  slimkit quantize mymodels.py:tiny_cnn --checkpoint tiny_cnn.safetensors --data calib.npy --out out/q
  slimkit quantize path/to/hf-model-folder --preset int8-dynamic --data sentences.txt --out out/q
  slimkit prune mymodels:tiny_cnn --checkpoint w.pt --data train.npz --sparsity 0.5 --round-to 8 \\
      --finetune 3 --out out/p
  slimkit sparse-train mymodels:tiny_cnn --data train.npz --preset rigl-90 --epochs 10 --init random --out out/s
  slimkit factorize mymodels:tiny_cnn --data images/ --image-size 224 --ratio 0.5 --out out/f
  slimkit qat slimkit.zoo:trained --factory-arg mlp --preset w4a8 --epochs 1 --out out/qat
  slimkit distill mymodels:small --teacher mymodels:big --teacher-checkpoint big.safetensors \\
      --data train.npz --epochs 5 --out out/d
  slimkit run examples/digits_recipe.yaml          # prune, distill, quantize; resumes if interrupted
  slimkit demo --out out/demo
  slimkit bench out/demo/fp32.onnx out/demo/slimkit_int8.onnx --data digits
  slimkit lint out/demo/slimkit_int8.onnx
  slimkit report out/recipe
  slimkit presets quantize
"""


def _attach_examples(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Every subcommand's --help ends with its examples from EXAMPLES."""
    lines = EXAMPLES.splitlines()
    for name, p in sub.choices.items():
        blocks = []
        for i, line in enumerate(lines):
            if line.strip().startswith(f"slimkit {name} ") or line.strip() == f"slimkit {name}":
                block = [line]
                while block[-1].rstrip().endswith("\\") and i + len(block) < len(lines):
                    block.append(lines[i + len(block)])
                blocks.append("\n".join(block))
        if blocks:
            p.epilog = "example:\n" + "\n".join(blocks)
            p.formatter_class = argparse.RawDescriptionHelpFormatter


def parser() -> argparse.ArgumentParser:
    from slimkit.cli.tools import add_tools
    from slimkit.cli.verbs import add_verbs

    p = argparse.ArgumentParser(prog="slimkit", description="Make trained PyTorch models smaller and faster.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_verbs(sub)
    add_tools(sub)
    _attach_examples(sub)
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[0].split()) if isinstance(e, OSError) else text


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # progress lines ("slimkit.progress") off a terminal, even without -v
        logging.getLogger("slimkit.progress").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # ONNX Runtime's quantizer (a peer) advises on the root logger
        handler.addFilter(lambda record: not str(record.msg).startswith("Please consider"))
    try:
        return int(args.fn(args))
    except (ValueError, OSError, TypeError) as e:  # bad input: a file, a flag, a key, a shape
        sys.stderr.write(f"slimkit: error: {_one_line(e)}\n")
        if args.verbose:
            logging.getLogger("slimkit.cli").exception("the error's traceback")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("slimkit: interrupted" + ("; run the same command again to resume\n" if args.cmd == "run" else "\n"))
        return 130
    except RuntimeError as e:
        sys.stderr.write(f"slimkit: failed: {e}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
