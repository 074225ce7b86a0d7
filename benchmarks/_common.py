"""What every benchmark script shares: the machine line, writing its results, and its main."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """``x86_64, 2 cores, AVX2 without VNNI``: what decides how fast INT8 can be."""
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    isa = ("AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags
           else "AVX2 without VNNI" if "avx2" in flags else "no AVX2")
    return f"{platform.machine()}, {os.cpu_count()} cores, {isa}" + (f", {model}" if model else "")


def write_results(name: str, res: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                  plot: Callable[[dict[str, Any], Path], None] | None = None, quick: bool = False) -> Path:
    """``results/<name>.{json,md,png}`` (a quick run writes to the temp folder instead); prints the markdown."""
    out = RESULTS if not quick else Path(tempfile.gettempdir()) / "slimkit-bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    if plot is not None:
        plot(res, out / f"{name}.png")
    text = markdown(res)
    (out / f"{name}.md").write_text(text)
    print(text)  # noqa: T201 -- a script's report
    return out


def bench_main(name: str, run: Callable[[str, bool], dict[str, Any]], markdown: Callable[[dict[str, Any]], str],
               plot: Callable[[dict[str, Any], Path], None] | None = None) -> None:
    """A benchmark script's ``main``: ``--quick``, logging, 2 torch threads, ``run(tmp, quick)`` in a
    temporary folder, then the results with the machine, library versions and seconds taken."""
    import onnxruntime as ort
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"machine": machine(), "onnxruntime": ort.__version__, "torch": torch.__version__, "quick": args.quick,
               **run(tmp, args.quick)}
    res["seconds"] = time.time() - t
    write_results(name, res, markdown, plot, args.quick)
