"""The quantize presets: named lists of passes (``quant/passes.py``).

>>> [p.name for p in PRESETS["int4-gptq"].passes]
['weights', 'activations', 'gptq', 'embeddings']
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from slimkit.quant.passes import (
    AWQ,
    GPTQ,
    Activations,
    AdaRound,
    BiasCorrection,
    Embeddings,
    Equalize,
    HalfPrecision,
    OutlierChannels,
    Quantize,
    QuantPass,
    SmoothQuant,
    Weights,
)

__all__ = ["PRESETS", "resolve_quantize"]

_FIRST_LAST_DEPTHWISE = ("first", "last", "depthwise")
_INT4_GROUPS = Weights(bits=4, reduce_range=False, group_size=128)

PRESETS: dict[str, Quantize] = {
    # Static W8A8 for the ONNX Runtime CPU: per-channel int8 weights (7-bit, 8 for depthwise convs),
    # per-tensor uint8 activations, bias correction towards the float model's own outputs from the
    # calibration data (EfficientNet-Lite1: 0.930 -> 0.938 top-1 agreement against correcting only
    # each layer's own rounding, benchmarks/results/ptq_real_cnn.md), embedding tables (if any) as int8 rows.
    "int8": Quantize.of([Weights(), Activations(), BiasCorrection(from_float=True), Embeddings()]),
    # Dynamic INT8 with 7-bit int8 weights (the fast uint8 x int8 kernels, no saturation).
    "int8-dynamic": Quantize.of([Weights(), Activations(mode="dynamic"), Embeddings()]),
    # Calibrated dynamic INT8 for transformers: SmoothQuant (alpha 0.5, the paper's default for
    # BERT-sized models) and LLM.int8()'s float outlier channels (over 8x the median channel's range),
    # with 7-bit weights: full 8-bit ones go as uint8 (zero-point 128), exact but slower on an AVX2
    # CPU than the fidelity they buy is worth (benchmarks/results/transformer_quant.md).
    "int8-smoothquant": Quantize.of([Weights(), Activations(mode="dynamic"), SmoothQuant(alpha=0.5),
                                     OutlierChannels(threshold=8.0), Embeddings()]),
    "int8-percentile": Quantize.of([Weights(), Activations(calibrator="percentile")]),
    "int8-entropy": Quantize.of([Weights(), Activations(calibrator="entropy")]),
    # Cross-layer equalization and bias correction before INT8 (helps depthwise nets).
    "int8-cle": Quantize.of([Weights(), Activations(), Equalize(), BiasCorrection()]),
    # 4-bit per-channel weights (int8 storage in ONNX, values in [-7, 7]) on a clipped grid, 8-bit
    # activations, bias correction; the stem, the classifier and depthwise convs stay INT8. With
    # AdaRound: 300 steps per layer from the weights' MSE grid, reconstructing the float model's own
    # outputs (asymmetric: EfficientNet-Lite1 0.785 -> 0.852 top-1 agreement, benchmarks/results/ptq_real_cnn.md).
    "w4a8": Quantize.of([Weights(bits=4, reduce_range=False, grid="output", int8_layers=_FIRST_LAST_DEPTHWISE),
                         Activations(), BiasCorrection()]),
    "w4a8-adaround": Quantize.of([Weights(bits=4, reduce_range=False, grid="mse", int8_layers=_FIRST_LAST_DEPTHWISE),
                                  Activations(), AdaRound(iterations=300, asymmetric=True), BiasCorrection()]),
    # 4-bit weight-only Linear layers in groups of 128 (MatMulNBits), for transformers; embedding
    # tables as int8 rows. Each preset is the variant benchmarks/results/int4_presets.md chose on the
    # trained zoo Llama and MiniLM together: the lowest loss with files on average no larger and decoding
    # at least 0.95x as fast as groups of 128 (groups of 64 or 32 are closer still, but decode 0.85-0.88x
    # as fast and their files are larger). Round to nearest keeps its grid (zero-points: 0.98x the loss in a
    # 1% larger file); GPTQ takes act-order (0.76x the loss, same size); AWQ zero-points and 4-bit
    # embedding rows (0.97x the loss in a file 0.77x as large on MiniLM).
    "int4-weight": Quantize.of([_INT4_GROUPS, Activations(mode="none"), Embeddings()]),
    "int4-gptq": Quantize.of([_INT4_GROUPS, Activations(mode="none"), GPTQ(act_order=True), Embeddings()]),
    "int4-awq": Quantize.of([Weights(bits=4, reduce_range=False, group_size=128, symmetric=False),
                             Activations(mode="none"), AWQ(), Embeddings(bits=4)]),
    # 4-bit NormalFloat weight-only Linear layers in QLoRA's blocks of 64 (quant/nf4.py): a grid of the
    # normal distribution's quantiles, closer than symmetric int4's on normally distributed weights at
    # these groups (tests/quant/test_nf4.py). ONNX Runtime has no NF4 kernel: the file keeps the codes
    # and dequantizes them with plain ops.
    "nf4-weight": Quantize.of([Weights(bits=4, reduce_range=False, group_size=64, format="nf4"),
                               Activations(mode="none"), Embeddings()]),
    # Static INT8 placed for TensorRT's explicit quantization (GPUs): symmetric int8 activations, float
    # biases, full 8-bit weights (a GPU's int8 kernels do not saturate), biases corrected towards the float
    # model; export/lint.py checks the file against TensorRT's rules on the CPU.
    "int8-tensorrt": Quantize.of([Weights(reduce_range=False), Activations(placement="tensorrt"),
                                  BiasCorrection(from_float=True)]),
    # 16-bit floats (quant/half.py). fp16 / bf16 compute in 16 bits with normalizations and softmax
    # modules in FP32: the GPU form, exported as a 16-bit file with FP32 inputs and outputs (ONNX
    # Runtime's CPU provider runs FP16 files, not BF16 ones). fp16-weights / bf16-weights keep 16-bit
    # weights and FP32 arithmetic: half the file, and the form every CPU runtime runs.
    "fp16": Quantize.of([HalfPrecision(dtype="float16")]),
    "bf16": Quantize.of([HalfPrecision(dtype="bfloat16")]),
    "fp16-weights": Quantize.of([HalfPrecision(dtype="float16", compute="float32")]),
    "bf16-weights": Quantize.of([HalfPrecision(dtype="bfloat16", compute="float32")]),
    # FP8 E4M3 (the format of current GPUs' FP8 tensor cores, quant/fp8.py): weights per output channel,
    # activations per tensor from calibrated ranges, as Q/DQ with float8 tensors (opset 19). ONNX
    # Runtime's CPU provider runs it in float (correct, not faster); TensorRT builds FP8 engines from it.
    "fp8": Quantize.of([Weights(format="fp8-e4m3", reduce_range=False), Activations(format="fp8-e4m3")]),
}


def resolve_quantize(spec: Any) -> Quantize:
    """What ``sk.quantize``, recipe stages and the CLI accept, as the list of passes it runs: a preset
    name, a ``Quantize``, a list of passes (configs, names or one-key dicts), a ``{"passes": [...]}``
    dict, or, deprecated, the old flat ``QuantConfig`` or its dict (translated by
    ``QuantConfig.to_passes()``, with a ``DeprecationWarning`` showing the new form)."""
    from slimkit.core.config import resolve
    from slimkit.quant.config import QuantConfig

    if isinstance(spec, Quantize):
        return spec
    if isinstance(spec, QuantPass):
        return Quantize.of([spec])
    if isinstance(spec, (list, tuple)):
        return Quantize.of(spec)
    if isinstance(spec, Mapping) and ("passes" in spec or not spec):
        return Quantize.from_dict(spec)
    if isinstance(spec, (QuantConfig, Mapping)):
        legacy = spec if isinstance(spec, QuantConfig) else QuantConfig.from_dict(spec)
        new = legacy.to_passes()
        warnings.warn(f"the flat QuantConfig (and its dict) is deprecated: quantize with a list of passes; this one is "
                      f"{new} (as a dict: {new.to_dict()['passes']})", DeprecationWarning, stacklevel=3)
        return new
    return resolve(spec, Quantize, PRESETS)
