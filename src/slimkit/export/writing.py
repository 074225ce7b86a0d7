"""Tracing to an ONNX model and writing it atomically, whatever its size.

A protobuf message holds at most 2 GiB, so a model whose tensors pass ``LARGE`` (a float
model of about 0.5 B parameters or more) is traced into a scratch folder instead of memory, and
written as ``model.onnx`` with its tensors in one file beside it, ``model.onnx.data`` (ONNX's
external data, which ONNX Runtime and onnxruntime-genai read from the model's folder). Either
way the file is checked at a temporary name in the output folder first and moved into place
only when the check passes: a failed export leaves nothing behind.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import onnx
from torch import nn

from slimkit.core.files import temp_dir, temp_file, user_mode

__all__ = ["LARGE", "weights_bytes", "traced", "write_checked", "data_file"]

LARGE = 2**31 - 2**27  # bytes of tensors above which a model is traced to disk and written with external data
T = TypeVar("T")


def data_file(path: str | os.PathLike[str]) -> Path:
    """Where a large model's tensors go: ``model.onnx.data`` beside ``model.onnx``."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def weights_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters and buffers, each storage counted once (tied weights)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _tensor_bytes(proto: onnx.ModelProto) -> int:
    total = sum(len(t.raw_data) for t in proto.graph.initializer)
    for node in proto.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += len(a.t.raw_data)
    return total


def traced(export: Callable[[Any], None], model: nn.Module, where: Path) -> onnx.ModelProto:
    """The ONNX model ``export(f)`` writes (``f`` a buffer, or a file path for a model whose weights
    pass ``LARGE``: torch writes those with their tensors beside it, in a scratch folder in
    ``where`` that is removed once they are read back)."""
    if weights_bytes(model) <= LARGE:
        buf = io.BytesIO()
        try:
            export(buf)
            return onnx.load_from_string(buf.getvalue())
        except RuntimeError as e:  # the graph's constants made it larger than the weights alone
            if "2GiB" not in str(e):
                raise
        del buf
    scratch = temp_dir(where, prefix=".slimkit-trace-")
    try:
        export(str(scratch / "model.onnx"))
        return onnx.load(str(scratch / "model.onnx"))  # with its external tensors read in
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_checked(proto: onnx.ModelProto, path: Path, check: Callable[[str], T]) -> tuple[T, int]:
    """Write ``proto`` to ``path`` atomically once ``check(temporary path)`` returns (it raises to
    refuse the file); returns what ``check`` returned and the bytes written (with the tensors' file,
    for a large model). ``proto`` passes ONNX's checker first."""
    if _tensor_bytes(proto) <= LARGE:
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
        fd, tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            result = check(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return result, len(data)
    scratch = temp_dir(path.parent, prefix=f".{path.name}.")  # the model and its tensors, at their final names
    try:
        staged, tensors = scratch / path.name, data_file(scratch / path.name)
        onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=tensors.name, size_threshold=1024)
        onnx.checker.check_model(str(staged))  # by path: the checker reads a model over 2 GiB only so
        for written in (staged, tensors):
            user_mode(written)
        result = check(str(staged))
        size = staged.stat().st_size + tensors.stat().st_size
        os.replace(tensors, data_file(path))  # the tensors first: the model never names a missing file
        os.replace(staged, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result, size

