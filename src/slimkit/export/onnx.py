"""Export to ONNX: standard QuantizeLinear/DequantizeLinear (QDQ) for quantized models, plain FP32
for float ones, with a dynamic batch axis. Every export is loaded back in ONNX Runtime and checked
for parity with the PyTorch model on the example inputs.

>>> import torch, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> report = export_onnx(torch.nn.Linear(4, 2), path, torch.randn(3, 4))
>>> report.parity.ok, report.inputs
(True, ['input'])
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.batch import Batch, cache_free, tensors_of
from slimkit.core.plans import has_plan, plans_of, reference_of
from slimkit.export.fold import fold_constants
from slimkit.export.lint import TARGETS, LintReport, lint
from slimkit.export.rewrite import (
    fold_pads_into_convs,
    relu_after_fp8_qdq,
    slim_quantized,
    store_half,
)
from slimkit.export.runtime import Parity, check_parity
from slimkit.export.runtimes import available
from slimkit.export.writing import traced, write_checked
from slimkit.quant.passes import HalfPrecision, Quantize

__all__ = ["export_onnx", "ExportReport", "OPSET", "opset_for", "EXPORT_TARGETS"]

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_TARGETS = (*TARGETS, "tflite")  # "tflite": a .tflite file for LiteRT, through ONNX (export/tflite.py)
FLOAT8_OPSET = 19  # QuantizeLinear / DequantizeLinear take float8 tensors from opset 19


def opset_for(model: nn.Module) -> int:
    """``OPSET``, or 19 where the model holds 8-bit float tensors (``quant/fp8.py``), which ONNX's
    Q/DQ take from that opset on."""
    float8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if any(b.dtype in float8 for b in model.buffers()) or any(getattr(m, "fmt", "int") != "int" for m in model.modules()):
        return FLOAT8_OPSET
    return OPSET


@dataclass
class ExportReport:
    path: str
    inputs: list[str]
    outputs: list[str]
    parity: Parity | None  # None only for a file ONNX Runtime cannot run here, written with check=False (BF16)
    lint: LintReport
    size_bytes: int
    # the same check run in the export's target runtime (OpenVINO, TVM) when it is installed here
    runtime_parity: Parity | None = None
    target: str = "onnxruntime"


def _is_quantized(model: nn.Module) -> bool:
    return has_plan(model, "quant")


def default_tolerance(model: nn.Module) -> float:
    """The file-vs-PyTorch tolerance used when the float model a quantized one came from is gone
    (with it, parity is judged against the float model: ``Parity``). 1e-4 for float models. For a
    quantized one, 2.5x the output error quantization measured on its first calibration batch
    (the file and the PyTorch result may each sit that far from the float model, in different
    directions), else 2e-2, or 0.15 where activations are rounded in a transformer or at run time
    (all-MiniLM-L6-v2 at static INT8: file and PyTorch 3e-2 apart, both at cosine 0.9917 with FP32)."""
    if not _is_quantized(model):
        return 1e-4
    measured = next((p.fidelity_["relative_l2"] for p in plans_of(model)[::-1]
                     if getattr(p, "kind", None) == "quant" and getattr(p, "fidelity_", None)), None)
    if measured is not None:
        return 2.5 * measured + 1e-3
    modules = list(model.modules())
    if any(getattr(m, "dynamic", False) for m in modules):
        return 0.15
    rounds_activations = any(hasattr(m, "calibrating") for m in modules)  # static activation quantizers
    return 0.15 if rounds_activations and any(isinstance(m, nn.LayerNorm) for m in modules) else 2e-2


def _target(model: nn.Module) -> str:
    """The runtime the model's last quantization placed its quantizers for (``Activations.placement``)."""
    acts = getattr(_quant_config(model), "activations", None)  # a QAT plan's config has none
    return "tensorrt" if getattr(acts, "placement", None) == "tensorrt" else "onnxruntime"


def _quant_config(model: nn.Module) -> Any:
    plan = next((p for p in plans_of(model)[::-1] if getattr(p, "kind", None) == "quant"), None)
    return getattr(plan, "config", None)


def _half_plan(model: nn.Module) -> Any:
    """The model's ``HalfPrecision`` pass, if its last quantization cast it to 16 bits."""
    cfg = _quant_config(model)
    return cfg.find(HalfPrecision) if isinstance(cfg, Quantize) else None


def _output_names(model: nn.Module, example: Batch) -> list[str]:
    with torch.no_grad():
        out = model(**example) if isinstance(example, Mapping) else (
            model(example) if isinstance(example, torch.Tensor) else model(*example))
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        return [str(k) for k in out.keys()]
    return [f"output_{i}" for i in range(len(tensors_of(out)))]


def export_onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: Batch,
                check: bool = True, tolerance: float | None = None,
                input_names: list[str] | None = None, generative: bool = False, target: str = "onnxruntime",
                static_shapes: bool | None = None, **generative_options: Any) -> Any:
    """Write ``model`` to ``path`` as ONNX and check it in ONNX Runtime.

    ``example_inputs`` is a batch as the model is called with (tensor, tuple, or dict of named
    inputs). The batch axis of every input and output is dynamic, and so is the second axis of the
    integer inputs of a dict batch (token ids and masks: the sequence length). With ``check`` (default), the
    ONNX model's outputs are compared with PyTorch's and a ``ParityError`` is raised when they
    disagree: for a quantized model whose float original the caller still holds, when the file is
    more than 1.5x as far from the float model's outputs as the PyTorch result is (+ 1e-3, relative
    L2: ``Parity``); otherwise past ``tolerance`` from the PyTorch result (``default_tolerance``; an
    explicit ``tolerance`` always uses this). A Hugging Face model that returns a key/value cache by
    default is exported cache-free (``use_cache=False``); each integer input's second axis has a
    dynamic length of its own (``input_ids_length``...).
    The file is written atomically: a failed export leaves no partial file behind.

    ``target``: the runtime the file is for (``lint.TARGETS``). ``"openvino"`` and ``"tvm"`` write a
    graph with its constant arithmetic folded (``export/fold.py``); ``"tvm"`` and ``"tensorrt"``
    write 4-bit layers as plain ONNX (the codes kept as bytes, split by BitShift, then MatMul)
    instead of ONNX Runtime's MatMulNBits. Where the target runtime is installed, the parity check
    runs there too (``report.runtime_parity``), and the lint says what it runs in float.
    ``"tflite"`` writes a ``.tflite`` file for LiteRT instead (``export/tflite.py``: CNNs; a QDQ
    model becomes full-integer ops with slimkit's own integers and scales), checked in LiteRT.
    ``static_shapes`` (default: only for ``"tvm"``, whose frontend fails on dynamic shape arithmetic):
    fix every input to the example's shape and fold the shape and mask arithmetic that follows.

    ``generative=True`` (a Hugging Face causal LM; ``example_inputs`` its token ids): the file is one
    decoding step with the key/value cache as inputs and outputs, in onnxruntime-genai's layout with
    its ``genai_config.json`` beside it, checked on greedy generation (``export/generative.py``);
    returns a ``GenerativeReport``; ``generative_options`` go to ``export_generative`` (``accuracy_level``).
    """
    if target not in EXPORT_TARGETS:
        raise ValueError(f"unknown target {target!r}; one of {', '.join(EXPORT_TARGETS)}")
    if generative:
        if target != "onnxruntime" or static_shapes:
            raise ValueError("a generative export is for ONNX Runtime (onnxruntime-genai's layout, dynamic lengths): "
                             "leave target and static_shapes unset")
        from slimkit.export.generative import export_generative

        return export_generative(model, path, example_inputs, check=check, tolerance=tolerance, **generative_options)
    if target == "tflite":
        if static_shapes is False:
            raise ValueError("target='tflite' converts the graph at the example's shapes (the batch stays free): "
                             "leave static_shapes unset")
        from slimkit.export.tflite import export_tflite

        return export_tflite(model, path, example_inputs, check=check, tolerance=tolerance, input_names=input_names)
    for name, m in model.named_modules():
        if getattr(m, "calibrating", False):
            raise ValueError(f"{type(m).__name__} is still calibrating; quantize with calib_data first")
        why = getattr(m, "export_error", None)
        if why:
            raise ValueError(f"layer {name!r} cannot be exported: {why}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the output path should end in .onnx, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    exported: nn.Module = model
    calls = cache_free(model, example_inputs)  # how PyTorch is called: the example, asking for no cache
    if isinstance(example_inputs, Mapping):
        names = input_names or list(example_inputs.keys())
        # named inputs go in positionally through a wrapper: the exporter's own dict handling can
        # bind them to the wrong parameters (Hugging Face's BertModel: "multiple values for use_cache")
        fixed = {k: v for k, v in calls.items() if k not in example_inputs} if isinstance(calls, Mapping) else {}
        exported = _NamedInputs(model, list(example_inputs.keys()), fixed).eval()  # export restores modes
        args: tuple[Any, ...] = tuple(example_inputs.values())
    else:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        names = input_names or (["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    outputs = _output_names(model, calls)
    dynamic: dict[str, dict[int, str]] = {n: {0: "batch"} for n in [*names, *outputs]}
    if isinstance(example_inputs, Mapping):  # tokenizer output: the sequence axis varies too
        for n in names:
            value = example_inputs.get(n)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and not value.is_floating_point():
                dynamic[n][1] = f"{n}_length"  # one name per input: encoder and decoder lengths differ
    def export(f: Any) -> None:
        with warnings.catch_warnings(), torch.no_grad(), _eager_attention(model), _no_fastpath():
            warnings.simplefilter("ignore")
            torch.onnx.export(exported, args, f, input_names=names,  # type: ignore[arg-type]
                              output_names=outputs,
                              dynamic_axes=dynamic, opset_version=opset_for(model), dynamo=False,
                              do_constant_folding=True)

    half = _half_plan(model)
    if check and half is not None and half.compute == "half" and half.dtype == "bfloat16":
        raise ValueError("a BF16 file cannot be checked here: ONNX Runtime's CPU provider has no BF16 MatMul, Add or "
                         "Softmax kernels. Export the CPU form, the 'bf16-weights' preset (BF16 weights, FP32 "
                         "arithmetic), or pass check=False to write the BF16 file for a GPU runtime unchecked")
    with int4_export(model, "export_standard", True, on=target in ("tvm", "tensorrt")):
        proto = traced(export, model, path.parent)
    if half is not None and half.compute == "float32":
        store_half(proto, half.dtype)
    quantized = _is_quantized(model)
    if quantized:
        fold_pads_into_convs(proto)
        slim_quantized(proto)  # and the pads' shapes, gone with them, are not kept either
        relu_after_fp8_qdq(proto)
    if static_shapes if static_shapes is not None else target == "tvm":
        shapes = {n: list(t.shape) for n, t in zip(names, args if not isinstance(example_inputs, Mapping)
                                                   else [example_inputs[n] for n in names], strict=True)}
        log.info("%s: inputs fixed to %s; %d constant nodes folded", path.name, shapes, fold_constants(proto, shapes))
    elif target in ("openvino", "tvm"):
        fold_constants(proto)

    cpu_runs = half is None or half.compute != "half" or half.dtype != "bfloat16"

    def checked(tmp: str) -> tuple[tuple[Parity | None, Parity | None], LintReport]:
        if not cpu_runs:  # check=False on a BF16 file: nothing here can run it
            return (None, None), LintReport({}, {}, 0, ["BF16 arithmetic: not run or checked here (ONNX Runtime's CPU "
                                                "provider has no BF16 kernels); a GPU runtime runs it"])
        tol = tolerance if tolerance is not None else default_tolerance(model)
        reference = reference_of(model) if quantized and tolerance is None else None
        parity = check_parity(model, tmp, calls, names, tol, reference)
        if check and not parity.ok:
            raise ParityError(f"ONNX Runtime disagrees with PyTorch on {path.name}: {parity}")
        in_target = None
        if target in ("openvino", "tvm") and available(target):
            in_target = check_parity(model, tmp, calls, names, tol, reference, runtime=target)
            if check and not in_target.ok:
                raise ParityError(f"{target} disagrees with PyTorch on {path.name}: {in_target}")
        elif target in ("openvino", "tvm"):
            log.info("%s is not installed here: %s checked in ONNX Runtime only", target, path.name)
        return (parity, in_target), lint(tmp, target if target != "onnxruntime" else _target(model))

    ((parity, runtime_parity), report_lint), size = write_checked(proto, path, checked)
    del proto
    if quantized and report_lint.issues:
        log.warning("export lint for %s: %s", path.name, "; ".join(report_lint.issues[:5]))
    log.info("exported %s (%.1f kB): %s", path, size / 1e3, parity)
    return ExportReport(str(path), names, outputs, parity, report_lint, size, runtime_parity, target)


@contextmanager
def int4_export(model: nn.Module, name: str, value: Any, on: bool = True) -> Iterator[None]:
    """Every 4-bit layer of ``model`` (``QuantLinearNBits``) exported with its class attribute
    ``name`` (``export_standard``, ``export_accuracy_level``) set to ``value``; restored after."""
    from slimkit.quant.weight_only import QuantLinearNBits

    layers = [m for m in model.modules() if isinstance(m, QuantLinearNBits)] if on else []
    for m in layers:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop(name, None)


@contextmanager
def _no_fastpath() -> Iterator[None]:
    """torch's ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` take a fused inference
    kernel under ``no_grad`` that has no ONNX form (``aten::_transformer_encoder_layer_fwd``) and that
    reads the layers' weights instead of calling them; traced without it, each layer runs its own
    forward (restored after)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Hugging Face implementations chosen for export. Models that attend through ``scaled_dot_product_attention`` are traced with
    their ``eager`` attention (the same arithmetic; restored after): the traced SDPA path adds mask
    guards per layer (``IsNaN``, ``Where``) and shape arithmetic that ONNX Runtime runs node by
    node (all-MiniLM-L6-v2: 366 nodes after ONNX Runtime's optimizations, 282 eager)."""
    switched: list[tuple[Any, str]] = []
    for m in model.modules():
        config = getattr(m, "config", None)
        switch = getattr(m, "set_attn_implementation", None)
        if callable(switch) and getattr(config, "_attn_implementation", None) == "sdpa":
            switch("eager")
            switched.append((switch, "sdpa"))
        # mixture-of-experts layers: the grouped kernel counts tokens per expert with ``histc``, which
        # has no ONNX form, and the eager loop visits only the experts the example routes to (a file
        # traced from it would compute another function on other inputs); ``batched_mm`` gathers
        # each token's expert weights, the same arithmetic with no data-dependent control flow
        experts = getattr(m, "set_experts_implementation", None)
        current = getattr(config, "_experts_implementation", None)
        if callable(experts) and current not in (None, "batched_mm"):
            experts("batched_mm")
            switched.append((experts, current))
    try:
        yield
    finally:
        for switch, before in switched:
            switch(before)


class _NamedInputs(nn.Module):
    """``model(**dict(zip(keys, args)))``: a model called with named inputs, exported positionally."""

    def __init__(self, model: nn.Module, keys: list[str], fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model, self.keys, self.fixed = model, keys, fixed or {}

    def forward(self, *args: Any) -> Any:
        return self.model(**dict(zip(self.keys, args, strict=True)), **self.fixed)


class ParityError(RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""
