"""Early exit in ONNX: an ``EarlyExit`` network as one ONNX file in which each input stops at the
first exit sure of its answer. Each stage (the layers up to an exit, and its head) is exported
alone and checked; the stages are then nested in ``If`` nodes: after stage ``k``, the rows whose
top softmax probability is below the threshold are gathered and, if there are any, run through
the rest of the network, and their answers are scattered back. A batch where every input is sure
at exit ``k`` never runs a later layer. The file has two outputs, ``logits`` and ``exit`` (the exit
each input took, ``len(exits)`` for the whole network), and an optional input ``threshold`` whose
default is the one exported. It runs in any ONNX runtime, in one session.

>>> import tempfile, os, torch
>>> from torch import nn
>>> from slimkit.prune import EarlyExit
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
>>> ee = EarlyExit(net, ["1"], example_inputs=torch.randn(2, 4), threshold=0.0).eval()
>>> path = os.path.join(tempfile.mkdtemp(), "ee.onnx")
>>> report = export_early_exit(ee, path, torch.randn(6, 4))
>>> logits, exits = EarlyExitSession(path)(torch.randn(5, 4))
>>> logits.shape, exits.tolist()
((5, 3), [0, 0, 0, 0, 0])
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import TensorProto, compose, helper, numpy_helper

from slimkit.core.batch import Batch, call, check_batches, modes_kept, tensors_of
from slimkit.core.files import write_atomic
from slimkit.export.onnx import OPSET, ParityError, default_tolerance, export_onnx
from slimkit.export.runtime import feeds, session

if TYPE_CHECKING:
    from slimkit.prune.early_exit import EarlyExit

__all__ = ["export_early_exit", "EarlyExitSession", "EarlyExitReport"]

log = logging.getLogger(__name__)


@dataclass
class EarlyExitReport:
    path: str
    inputs: list[str]
    stages: int
    threshold: float
    exits_agree: float  # share of the example inputs that leave at the same exit as in PyTorch
    rel_l2: float  # of the file's logits against PyTorch's, on the inputs that took the same exit
    size_bytes: int


def _rows(batch: Batch) -> int:
    ts = tensors_of(batch)
    if not ts or ts[0].dim() == 0:
        raise ValueError("example_inputs: an early-exit export needs inputs with a batch axis")
    return int(ts[0].shape[0])


def _stage_graphs(model: EarlyExit, example_inputs: Batch, folder: Path, tolerance: float) -> list[onnx.GraphProto]:
    """Every stage exported alone (and checked against PyTorch), names prefixed ``s<k>/``."""
    n = _rows(example_inputs)
    stages = model.stages()
    graphs = []
    batch: Batch = example_inputs
    for k, stage in enumerate(stages):
        out = tensors_of(call(stage, batch))
        if k < len(stages) - 1:
            for i, t in enumerate(out[:-1]):  # what goes on to the next stage is cut row by row
                if t.dim() == 0 or t.shape[0] != n:
                    raise ValueError(
                        f"after exit {model.exits[k]!r} the rest of the network needs a value of shape "
                        f"{tuple(t.shape)} (carried value {i}) with no batch axis of {n} rows; only per-input "
                        "tensors can be handed from stage to stage; move the exit to a layer after which every "
                        "value used later is per input")
        path = export_onnx(stage, folder / f"stage{k}.onnx", batch, tolerance=tolerance).path
        graphs.append(compose.add_prefix_graph(onnx.load(path).graph, f"s{k}/"))
        batch = tuple(out[:-1])
    return graphs


def _compose(graphs: list[onnx.GraphProto], threshold: float) -> onnx.ModelProto:
    """The stages nested in ``If`` nodes (see the module docstring)."""
    last = len(graphs) - 1
    # a later stage's weights live in the branch that runs it: there they are the branch's own
    # constants, which ONNX Runtime pre-packs for its kernels (read from the outer scope they are not,
    # and a branch's convolutions run markedly slower)
    inits = list(graphs[0].initializer)
    inits.append(numpy_helper.from_array(np.array(threshold, dtype=np.float32), "threshold"))
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "ee/minus_one"))

    def level(k: int) -> list[onnx.NodeProto]:
        """Nodes computing ``ee/logits<k>`` and ``ee/exit<k>`` once stage ``k``'s inputs exist."""
        g, p = graphs[k], f"ee/{k}/"
        nodes = list(g.node)
        outs = [o.name for o in g.output]
        if k == last:
            return nodes + [
                helper.make_node("Identity", [outs[0]], [f"ee/logits{k}"]),
                helper.make_node("Shape", [outs[0]], [p + "shape"], end=1),
                helper.make_node("ConstantOfShape", [p + "shape"], [f"ee/exit{k}"],
                                 value=numpy_helper.from_array(np.array([k], dtype=np.int64)))]
        z = outs[-1]
        nodes += [
            helper.make_node("Softmax", [z], [p + "prob"], axis=-1),
            helper.make_node("ReduceMax", [p + "prob"], [p + "conf"], axes=[-1], keepdims=0),
            helper.make_node("Less", [p + "conf", "threshold"], [p + "unsure"]),
            helper.make_node("Cast", [p + "unsure"], [p + "unsure_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", [p + "unsure_f"], [p + "any_f"], keepdims=0),
            helper.make_node("Cast", [p + "any_f"], [p + "any"], to=TensorProto.BOOL),
            helper.make_node("Shape", [z], [p + "shape"], end=1),
            helper.make_node("ConstantOfShape", [p + "shape"], [p + "here"],
                             value=numpy_helper.from_array(np.array([k], dtype=np.int64)))]
        nxt = graphs[k + 1]
        rest = [helper.make_node("NonZero", [p + "unsure"], [p + "nz"]),
                helper.make_node("Transpose", [p + "nz"], [p + "idx"], perm=[1, 0]),
                helper.make_node("Reshape", [p + "nz", "ee/minus_one"], [p + "rows"])]
        rest += [helper.make_node("Gather", [c, p + "rows"], [i.name], axis=0)
                 for c, i in zip(outs[:-1], nxt.input, strict=True)]
        rest += level(k + 1)
        rest += [helper.make_node("ScatterND", [z, p + "idx", f"ee/logits{k + 1}"], [p + "logits_rest"]),
                 helper.make_node("ScatterND", [p + "here", p + "idx", f"ee/exit{k + 1}"], [p + "exit_rest"])]
        then = helper.make_graph(rest, f"rest_after_exit{k}", [], [
            helper.make_tensor_value_info(p + "logits_rest", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(p + "exit_rest", TensorProto.INT64, None)], initializer=list(nxt.initializer))
        done = helper.make_graph([helper.make_node("Identity", [z], [p + "logits_done"]),
                                  helper.make_node("Identity", [p + "here"], [p + "exit_done"])],
                                 f"all_sure_at_exit{k}", [], [
            helper.make_tensor_value_info(p + "logits_done", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(p + "exit_done", TensorProto.INT64, None)])
        return nodes + [helper.make_node("If", [p + "any"], [f"ee/logits{k}", f"ee/exit{k}"],
                                         then_branch=then, else_branch=done)]

    inputs = []
    for i in graphs[0].input:  # the model's inputs keep their own names
        named = onnx.ValueInfoProto()
        named.CopyFrom(i)
        named.name = i.name.removeprefix("s0/")
        inputs.append(named)
    nodes = [helper.make_node("Identity", [n.name], [i.name]) for n, i in zip(inputs, graphs[0].input, strict=True)]
    nodes += level(0) + [helper.make_node("Identity", ["ee/logits0"], ["logits"]),
                         helper.make_node("Identity", ["ee/exit0"], ["exit"])]
    inputs.append(helper.make_tensor_value_info("threshold", TensorProto.FLOAT, []))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None]),
               helper.make_tensor_value_info("exit", TensorProto.INT64, ["batch"])]
    graph = helper.make_graph(nodes, "early_exit", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="slimkit")
    onnx.checker.check_model(model)
    return model


def export_early_exit(model: EarlyExit, path: str | os.PathLike[str], example_inputs: Batch,
                      threshold: float | None = None, tolerance: float | None = None) -> EarlyExitReport:
    """Write ``model`` (an ``EarlyExit``) to ``path`` as one ONNX file that stops each input at its
    first sure exit, and check it in ONNX Runtime: each stage's parity with PyTorch, then the file's
    logits and exits against ``model``'s on ``example_inputs``. ``threshold`` defaults to the
    model's own; the file's ``threshold`` input can override it at run time. ``tolerance`` (relative
    L2 error) defaults to ``export_onnx``'s for the model: 1e-4 in float, looser where it is
    quantized and ONNX Runtime rounds activations itself. Written atomically."""
    threshold = model.threshold if threshold is None else threshold
    if threshold is None or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"an early-exit export needs a confidence threshold in [0, 1], got {threshold!r}; "
                         "set model.threshold or pass threshold=")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the output path should end in .onnx, got {path}")
    check_batches([example_inputs], "example_inputs")  # NaN would pass every parity check silently
    tolerance = default_tolerance(model) if tolerance is None else tolerance
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp, modes_kept(model), \
            torch.no_grad():
        model.eval()
        composed = _compose(_stage_graphs(model, example_inputs, Path(tmp), tolerance), float(threshold))
        data = composed.SerializeToString()
        candidate = Path(tmp) / path.name
        candidate.write_bytes(data)
        got, exits = EarlyExitSession(candidate)(example_inputs)
        saved = model.threshold
        try:
            model.threshold = threshold
            ref = call(model, example_inputs).float().numpy()
            ref_exits = model.last_exit.numpy()  # type: ignore[union-attr]
        finally:
            model.threshold = saved
        same = exits == ref_exits
        agree = float(np.mean(same))
        rel = float(np.linalg.norm(got[same] - ref[same]) / max(float(np.linalg.norm(ref[same])), 1e-30)) \
            if same.any() else 0.0
        if rel > tolerance or agree < 0.95:
            raise ParityError(f"the ONNX early-exit model disagrees with PyTorch on {path.name}: {100 * agree:.1f}% "
                              f"of inputs take the same exit, relative L2 error {rel:.2e} (tolerance {tolerance:.0e})")
        write_atomic(path, data)
    inputs = [i.name for i in composed.graph.input if i.name != "threshold"]
    log.info("exported early exit %s (%.1f kB): exits %s at threshold %.3f; %.1f%% same exits as PyTorch",
             path, len(data) / 1e3, model.exits, threshold, 100 * agree)
    return EarlyExitReport(str(path), inputs, len(model.exits) + 1, float(threshold), agree, rel, len(data))


class EarlyExitSession:
    """An early-exit ONNX file in ONNX Runtime. Called with a batch, returns ``(logits, exits)`` as
    NumPy arrays; ``threshold`` (default: the file's own) is fed to the file's ``threshold`` input."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 2, threshold: float | None = None) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no early-exit model at {path}")
        self.sess = session(str(path), threads)
        names = [o.name for o in self.sess.get_outputs()]
        if names != ["logits", "exit"]:
            raise ValueError(f"{path} is not an early-exit model: its outputs are {names}, not ['logits', 'exit'] "
                             "(export_early_exit writes one)")
        self.inputs = [i.name for i in self.sess.get_inputs() if i.name != "threshold"]
        self.extra = {} if threshold is None else {"threshold": np.array(threshold, dtype=np.float32)}

    def __call__(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        logits, exits = self.sess.run(None, {**feeds(self.sess, batch, self.inputs), **self.extra})
        return logits, exits
