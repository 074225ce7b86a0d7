"""One exported file in the runtimes users deploy with: ONNX Runtime (always installed), OpenVINO,
Apache TVM and LiteRT (TFLite's runtime, for ``.tflite`` files; optional: ``pip install slimkit[runtimes]``). ``open_file(path, runtime)`` gives a
``Runner`` with the file's input names and ``run(feeds)``; ``compare_runtime_latency`` times files
in one runtime in interleaved rounds; ``integer_kernels`` says which of the file's weighted layers
the runtime runs on integer kernels, read off what it compiled (OpenVINO's runtime model), not
guessed from the graph.

>>> "onnxruntime" in RUNTIMES and available("onnxruntime")
True
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["RUNTIMES", "Runner", "available", "open_file", "compare_runtime_latency", "integer_kernels"]

RUNTIMES = ("onnxruntime", "openvino", "tvm", "litert")
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tvm": "tvm", "litert": "ai_edge_litert"}
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tvm": "apache-tvm", "litert": "ai-edge-litert"}


class Runner(Protocol):
    input_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


def available(runtime: str) -> bool:
    """Whether ``runtime`` is installed here."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    return importlib.util.find_spec(_MODULES[runtime]) is not None


def _require(runtime: str) -> None:
    if not available(runtime):
        raise ValueError(f"runtime {runtime!r} is not installed: pip install {_PACKAGES[runtime]} (or slimkit[runtimes])")


class _Ort:
    def __init__(self, path: str, threads: int) -> None:
        from slimkit.export.runtime import session

        self.sess = session(path, threads)
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.sess.run(None, dict(feeds)))


class _OpenVINO:
    """OpenVINO's CPU plugin, latency hint, one stream, ``threads`` inference threads. Float layers
    stay FP32 (``INFERENCE_PRECISION_HINT``): on CPUs with BF16 units the plugin would otherwise run
    an FP32 file in BF16 (2e-3 from ONNX Runtime on the digits ResNet), another format than asked."""

    def __init__(self, path: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                              "PERFORMANCE_HINT": "LATENCY",
                                                              "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as e:  # OpenVINO raises its own RuntimeError subclasses, with long traces
            raise ValueError(f"{path}: OpenVINO could not load the file ({_first_line(e)})") from e
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        out = self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return [np.asarray(out[p]) for p in self.compiled.outputs]


_TVM_COMPILED: dict[tuple[Any, ...], Any] = {}


class _TVM:
    """Apache TVM's Relax ONNX frontend, compiled for this CPU (LLVM) at the shapes of the first
    feeds it sees (a new compilation for other shapes), run in its virtual machine."""

    def __init__(self, path: str, threads: int) -> None:
        import onnx

        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        self.path, self.model = str(path), onnx.load(str(path))
        init = {i.name for i in self.model.graph.initializer}
        self.input_names = [i.name for i in self.model.graph.input if i.name not in init]
        self.compiled: dict[tuple[Any, ...], Any] = {}

    def _vm(self, feeds: Mapping[str, np.ndarray]) -> Any:
        key = (self.path, os.path.getmtime(self.path), *((k, v.shape, str(v.dtype)) for k, v in feeds.items()))
        if key in _TVM_COMPILED:  # compiling takes a minute on a transformer: the last few are kept
            self.compiled[key] = _TVM_COMPILED[key]
        if key not in self.compiled:
            import tvm
            from tvm import relax
            from tvm.relax.frontend.onnx import from_onnx

            try:
                mod = from_onnx(self.model, shape_dict={k: list(v.shape) for k, v in feeds.items()},
                                dtype_dict={k: str(v.dtype) for k, v in feeds.items()}, keep_params_in_input=False)
                mod = relax.transform.DecomposeOpsForInference()(mod)
                mod = relax.transform.LegalizeOps()(mod)
                lib = tvm.compile(mod, target=tvm.target.Target.from_device(tvm.cpu()))
            except Exception as e:  # TVM raises TVMError and others, with C++ traces
                raise ValueError(f"{self.path}: TVM could not load the file ({_first_line(e)})") from e
            self.compiled[key] = relax.VirtualMachine(lib, tvm.cpu())
            _TVM_COMPILED[key] = self.compiled[key]
            while len(_TVM_COMPILED) > 4:
                del _TVM_COMPILED[next(iter(_TVM_COMPILED))]
        return self.compiled[key]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        vm = self._vm(feeds)
        out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in self.input_names])
        outs = out if isinstance(out, (list, tuple)) or type(out).__name__ == "Array" else [out]
        return [o.numpy() for o in outs]


class _LiteRT:
    """LiteRT's interpreter (its default XNNPACK delegate, ``threads`` threads) on a ``.tflite``
    file; inputs of another batch size resize the interpreter (the files keep the batch dynamic)."""

    def __init__(self, path: str, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interp = Interpreter(model_path=str(path), num_threads=threads)
            self.interp.allocate_tensors()
        except Exception as e:  # LiteRT raises ValueError / RuntimeError with its own text
            raise ValueError(f"{path}: LiteRT could not load the file ({_first_line(e)})") from e
        self.path = str(path)
        self.inputs = self.interp.get_input_details()
        self.input_names = [d["name"] for d in self.inputs]
        self.shapes = {d["name"]: tuple(d["shape"]) for d in self.inputs}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        resized = False
        for d in self.inputs:
            x = feeds[d["name"]]
            if tuple(x.shape) != self.shapes[d["name"]]:
                if len(x.shape) != len(d["shape"]) or any(
                        a != b and s != -1 for a, b, s in zip(x.shape[1:], d["shape"][1:], d["shape_signature"][1:], strict=True)):
                    raise ValueError(f"{self.path}: input {d['name']!r} has shape {list(d['shape_signature'])} (-1: free); "
                                     f"got {list(x.shape)}")
                self.interp.resize_tensor_input(d["index"], list(x.shape))
                self.shapes[d["name"]] = tuple(x.shape)
                resized = True
        if resized:
            self.interp.allocate_tensors()
        for d in self.inputs:
            self.interp.set_tensor(d["index"], np.ascontiguousarray(feeds[d["name"]], dtype=d["dtype"]))
        self.interp.invoke()
        return [self.interp.get_tensor(d["index"]).copy() for d in self.interp.get_output_details()]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("File ", "at ", "#"))]
    return (lines[-1] if lines else type(e).__name__)[:300]


def open_file(path: str, runtime: str = "onnxruntime", threads: int = 2) -> Runner:
    """``path`` loaded and compiled in ``runtime`` with ``threads`` threads; a file the runtime cannot
    load is a ``ValueError`` naming the file and the runtime's reason."""
    _require(runtime)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such {'TFLite' if runtime == 'litert' else 'ONNX'} file")
    if (runtime == "litert") != str(path).endswith(".tflite"):
        raise ValueError(f"{path}: LiteRT runs .tflite files (export_onnx(..., target='tflite')), the other runtimes "
                         f".onnx files; {runtime} cannot run this one")
    if runtime == "litert":
        return _LiteRT(path, threads)
    if runtime == "openvino":
        return _OpenVINO(path, threads)
    if runtime == "tvm":
        return _TVM(path, threads)
    return _Ort(path, threads)


def compare_runtime_latency(paths: list[str], feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
                            runtime: str = "onnxruntime", threads: int = 2, rounds: int = 5, seconds: float = 0.5,
                            warmup: int = 10) -> list[dict[str, float]]:
    """Median latency (ms) of each file in ``runtime``, timed in interleaved rounds: each round runs
    every file for ``seconds``, so drift of the machine hits them alike. ``feeds`` is one feed dict
    for all files or one per file. Each file is compiled once (TVM and OpenVINO compile for minutes
    on big models) and its runner kept between rounds."""
    per_file = [feeds] * len(paths) if isinstance(feeds, Mapping) else list(feeds)
    runners = [open_file(p, runtime, threads) for p in paths]
    times: list[list[float]] = [[] for _ in paths]
    for r, f in zip(runners, per_file, strict=True):
        for _ in range(warmup):
            r.run(f)
    for _ in range(rounds):
        for i, (r, f) in enumerate(zip(runners, per_file, strict=True)):
            start = time.perf_counter()
            while time.perf_counter() - start < seconds or len(times[i]) < 5:
                t0 = time.perf_counter()
                r.run(f)
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [{"median_ms": statistics.median(t), "min_ms": min(t), "runs": float(len(t)), "threads": threads}
            for t in times]


WEIGHTED_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


def integer_kernels(path: str, runtime: str = "openvino") -> dict[str, dict[str, int]]:
    """The weighted layers ``runtime`` compiled from ``path``, counted by the precision they run
    in: ``{"FullyConnected": {"i8": 6, "f32": 1}, ...}``. OpenVINO says it in its runtime model
    (``runtimePrecision`` of each executed layer); ONNX Runtime through the integer ops its
    optimized graph keeps (``lint``)."""
    if runtime == "onnxruntime":
        from slimkit.export.lint import lint

        rep = lint(path)
        return {"integer": dict(rep.integer_ops), "float": dict(rep.float_ops)}
    if runtime == "litert":  # the interpreter's own op list: {"CONV_2D": {"int8": 20}, ...}
        from slimkit.export.tflite import op_types

        litert: dict[str, Counter[str]] = {}
        for key, n in op_types(str(path)).items():
            op, dtype = key.split(":")
            litert.setdefault(op, Counter())[dtype] += n
        return {k: dict(v) for k, v in litert.items()}
    if runtime != "openvino":
        raise ValueError(f"integer_kernels reads OpenVINO's, LiteRT's or ONNX Runtime's compiled graph, not {runtime!r}'s")
    runner = open_file(path, "openvino", 1)
    assert isinstance(runner, _OpenVINO)
    counts: dict[str, Counter[str]] = {}
    for op in runner.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].astype(str)) if "layerType" in info else op.get_type_name()
        if layer in WEIGHTED_LAYERS:
            precision = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else "?"
            counts.setdefault(layer, Counter())[precision.lower()] += 1
    return {k: dict(v) for k, v in counts.items()}
