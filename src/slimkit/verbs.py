"""Each verb's config class and named configs (presets), in one table: ``sk.presets(verb)``, the
verbs themselves and recipe stages all read it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimkit.distill.config import PRESETS as DISTILL_PRESETS
from slimkit.distill.config import DistillConfig
from slimkit.lowrank.config import PRESETS as FACTORIZE_PRESETS
from slimkit.lowrank.config import FactorizeConfig
from slimkit.prune.config import PRESETS as PRUNE_PRESETS
from slimkit.prune.config import PruneConfig
from slimkit.prune.dynamic import PRESETS as SPARSE_PRESETS
from slimkit.prune.dynamic import SparseTrainConfig
from slimkit.quant.passes import Quantize
from slimkit.quant.presets import PRESETS as QUANT_PRESETS
from slimkit.quant.presets import resolve_quantize
from slimkit.quant.qat import QAT_PRESETS, QATConfig

__all__ = ["VERBS", "PRESET_TABLES", "DESCRIPTIONS", "describe", "resolve_config"]

VERBS: dict[str, tuple[type, Mapping[str, Any]]] = {
    "quantize": (Quantize, QUANT_PRESETS),
    "qat": (QATConfig, QAT_PRESETS),
    "prune": (PruneConfig, PRUNE_PRESETS),
    "factorize": (FactorizeConfig, FACTORIZE_PRESETS),
    "distill": (DistillConfig, DISTILL_PRESETS),
}

# Every table of named configs: the verbs', and dynamic sparse training's (``slimkit.prune.sparse_train``,
# the recipe stage ``sparse_train``, ``slimkit sparse-train``).
PRESET_TABLES: dict[str, tuple[type, Mapping[str, Any]]] = {**VERBS, "sparse_train": (SparseTrainConfig, SPARSE_PRESETS)}

def resolve_config(kind: str, spec: Any) -> Any:
    """The config of verb or table ``kind`` from a config, a dict or a preset name (for ``quantize``
    also a list of passes): what the Python verbs, recipe stages and the CLI all call."""
    if kind == "quantize":
        return resolve_quantize(spec)
    from slimkit.core.config import resolve

    return resolve(spec, *PRESET_TABLES[kind])


# One line per preset: what it is, what it is for, whether it needs data, and what it measured in a
# committed benchmark file (``slimkit presets``, the README's and the docs' tables).
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "quantize": {
        "int8": "static INT8, calibrated, biases corrected towards the float model: CNNs and transformers on the "
                "CPU; needs data; 0.25-0.27x the file, 0.35-0.6x a CNN's latency, EfficientNet-Lite1 0.938 top-1 "
                "agreement (ptq_cnn, ptq_real_cnn)",
        "int8-dynamic": "dynamic INT8 Linear layers: transformers; no data; MiniLM cosine 0.992 at 0.55x the latency "
                        "(transformer_quant)",
        "int8-smoothquant": "int8-dynamic with SmoothQuant and float outlier channels: transformers; needs data; MiniLM "
                            "cosine 0.997 at 0.56x, 0.26x the file (transformer_quant)",
        "int8-percentile": "static INT8 with 99.99th-percentile activation ranges: CNNs; needs data",
        "int8-entropy": "static INT8 with KL-divergence activation ranges (can over-clip CNNs); needs data",
        "int8-cle": "static INT8 after cross-layer equalization and bias correction: depthwise CNNs; needs data",
        "w4a8": "4-bit weights on a clipped grid, INT8 activations, stem, classifier and depthwise in INT8: CNNs; "
                "needs data; stored as int8, so no smaller than int8 (ptq_real_cnn)",
        "w4a8-adaround": "w4a8 with AdaRound's learned rounding, reconstructing the float model's outputs: CNNs; "
                         "needs data; minutes per model (EfficientNet-Lite1 0.852 top-1 agreement in 272 s, "
                         "ptq_real_cnn)",
        "int4-weight": "4-bit weight-only Linear layers in groups of 128 (MatMulNBits): LLMs and transformers; no "
                       "data; 0.18-0.20x the file, decoding 2.98x FP32's tokens per second at batch 1 (int4_presets)",
        "int8-tensorrt": "static INT8 placed for TensorRT's explicit quantization: symmetric int8 activations, "
                         "float biases, quantized residual inputs; GPUs; needs data; checked against TensorRT's "
                         "rules by the export lint (not built in TensorRT here)",
        "fp16": "FP16 arithmetic with normalizations and softmax in FP32, FP32 inputs and outputs: the GPU "
                "baseline; no data; a 16-bit ONNX file (float_formats)",
        "bf16": "BF16 arithmetic (FP32's range, 7 mantissa bits), normalizations and softmax in FP32: GPUs and "
                "BF16 CPUs; no data; ONNX Runtime's CPU provider has no BF16 kernels: export bf16-weights for "
                "it (float_formats)",
        "fp16-weights": "FP16 weights, FP32 arithmetic: half the file, any runtime, the CPU form; no data "
                        "(float_formats)",
        "bf16-weights": "BF16 weights, FP32 arithmetic: half the file, any runtime; no data (float_formats)",
        "fp8": "FP8 E4M3 weights per channel and activations per tensor, calibrated, as Q/DQ with float8 "
               "tensors (opset 19): GPUs with FP8 tensor cores; needs data; runs in float on the CPU "
               "(float_formats)",
        "int4-gptq": "int4-weight with GPTQ's error-compensating rounding, in act-order: LLMs; needs data; the "
                     "closest to FP32 of the 4-bit presets (int4_presets)",
        "int4-awq": "int4-weight with AWQ's activation-aware scaling and clipping, zero-points and 4-bit embedding "
                    "rows: LLMs; needs data (int4_presets)",
        "nf4-weight": "4-bit NormalFloat weight-only Linear layers in groups of 64 (QLoRA's grid), exported as plain "
                      "ONNX lookups: fidelity at 4 bits, no 4-bit kernel (the runtime dequantizes to float); no data",
    },
    "qat": {
        "int8": "INT8 quantization-aware training (fake quantization, straight-through estimator); needs "
                "(inputs, labels)",
        "w4a8": "4-bit weights, INT8 activations, straight-through estimator: CNNs; needs (inputs, labels) (low_bit)",
        "w4a8-lsq": "w4a8 with learned step sizes (LSQ); needs (inputs, labels) (low_bit)",
        "w4a8-pact": "w4a8 with learned activation clipping (PACT); needs (inputs, labels)",
    },
    "prune": {
        "channels-50": "structured: half the channels removed (counts multiples of 8): a smaller dense model, "
                       "CNNs and transformers; 0.27x ResNet-18's latency (pruning)",
        "unstructured-80": "80% of the weights zeroed, one global magnitude threshold: no speed-up in dense "
                           "kernels (pruning)",
        "2:4": "N:M sparsity, 2 of every 4 weights kept: the pattern sparse tensor cores run",
    },
    "factorize": {
        "svd-50": "truncated SVD of Linear layers and 1x1 convs, half the weights kept: 0.51x a Linear's latency "
                  "(lowrank)",
        "svd-whitened-50": "data-whitened SVD (SVD-LLM), half the weights kept: transformers; needs data; MiniLM "
                           "FFN cosine 0.876 against 0.595 unwhitened (lowrank)",
    },
    "sparse_train": {
        "rigl-90": "RigL dynamic sparse training at 90%: ERK budgets, 30% of each layer's weights moved every 100 "
                   "steps, decaying; needs (inputs, labels) (pruning, dynamic section)",
        "rigl-80": "RigL at 80% (pruning, dynamic section)",
        "set-90": "SET at 90%: the connections regrown at random (pruning, dynamic section)",
    },
    "distill": {
        "kd": "offline response distillation (soft targets, T=4, alpha 0.5) from a frozen teacher; needs "
              "(inputs, labels) (distill)",
        "mutual": "online deep mutual learning: the student and its peers teach each other (distill)",
    },
}


def describe(verb: str, name: str) -> str:
    """The preset's one-line description."""
    return DESCRIPTIONS[verb][name]
