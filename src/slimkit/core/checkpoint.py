"""A Hugging Face model folder read one tensor at a time: a model larger than memory is built as a
skeleton whose parameters take no memory (``meta`` tensors), and the parts wanted are loaded from
the folder's safetensors shards when they are needed (``Checkpoint.load``).

Only safetensors files are read (never a pickled ``pytorch_model.bin``), each opened for the
tensors asked for and closed again, and read rather than memory-mapped, so what stays in memory is
what was loaded.

>>> import tempfile, torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                num_attention_heads=4, num_key_value_heads=2)
>>> folder = tempfile.mkdtemp()
>>> transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
>>> ckpt = Checkpoint(folder)
>>> model = ckpt.skeleton()
>>> model.model.layers[0].mlp.up_proj.weight.device.type
'meta'
>>> ckpt.load(model, "model.layers.0")
>>> model.model.layers[0].mlp.up_proj.weight.device.type, tuple(model.model.layers[0].mlp.up_proj.weight.shape)
('cpu', (64, 32))
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Checkpoint", "params_on_meta", "is_lazy", "release_memory"]

log = logging.getLogger(__name__)

_INDEX, _SINGLE = "model.safetensors.index.json", "model.safetensors"


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers goes to the ``meta`` device: building a model
    allocates only its buffers (rotary tables, masks), which it computes itself and checkpoints often
    leave out. Initializing the meta parameters costs nothing."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path, f: Any) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, byte offsets) and where its data starts."""
    raw = f.read(8)
    size = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if size <= 0 or size > 100_000_000:
        raise ValueError(f"{path} is corrupt: not a safetensors file (header length {size})")
    try:
        header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its header is not an object")
    return header, 8 + size


def release_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back to the system (glibc's
    ``malloc_trim``, where there is one): loading and quantizing block after block otherwise
    leaves each block's freed float buffers fragmenting the heap, and the process's memory
    grows by most of a float block per block (measured: 75 MB against 13 MB per block of a
    0.5 B Llama, ``benchmarks/llm_memory.py``)."""
    import gc

    gc.collect()
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            import ctypes.util

            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def is_lazy(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is still a ``meta`` tensor (not loaded)."""
    return any(p.device.type == "meta" for p in module.parameters())


class Checkpoint:
    """A model folder: ``config.json`` and ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``. Errors name the folder, the file or the tensor at fault."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder: a checkpoint to quantize is a model folder "
                                    "(config.json and safetensors weights)")
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder / 'config.json'} is missing: the folder has no model config")
        self.where: dict[str, Path] = {}
        index, single = self.folder / _INDEX, self.folder / _SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is corrupt: {e}") from e
            for name, file in weight_map.items():
                path = self.folder / file
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: {index} lists it for {name!r}")
                self.where[name] = path
        elif single.is_file():
            with open(single, "rb") as f:
                header, _ = _header(single, f)
            self.where = dict.fromkeys((k for k in header if k != "__metadata__"), single)
        else:
            pickled = [p.name for p in self.folder.glob("*.bin")]
            raise FileNotFoundError(
                f"{self.folder} has no safetensors weights ({_SINGLE} or {_INDEX})"
                + (f"; {', '.join(pickled)} would have to be unpickled, which slimkit does not do: convert it with "
                   "transformers (model.save_pretrained(folder, safe_serialization=True))" if pickled else ""))

    def config(self, model_class: Any = None) -> Any:
        """The folder's config: as ``model_class``'s config class when it names one, else by its
        ``model_type`` (a model of one's own without one: a plain ``PretrainedConfig``)."""
        import transformers

        config_class = getattr(model_class, "config_class", None)
        try:
            if isinstance(config_class, type) and issubclass(config_class, transformers.PretrainedConfig):
                return config_class.from_pretrained(str(self.folder), local_files_only=True)
            try:
                return transformers.AutoConfig.from_pretrained(str(self.folder), local_files_only=True)
            except ValueError:
                if model_class is None:
                    raise
                return transformers.PretrainedConfig.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{self.folder / 'config.json'} cannot be read as a transformers config: {e}") from e

    def skeleton(self, model_class: Any = None) -> nn.Module:
        """The model the folder holds, built with every parameter on ``meta``: ``model_class`` (a
        transformers class) or the config's first ``architectures`` entry."""
        import transformers

        config = self.config(model_class)
        if model_class is None:
            arch = (getattr(config, "architectures", None) or [None])[0]
            model_class = getattr(transformers, arch, None) if arch else None
            if model_class is None:
                raise ValueError(f"{self.folder / 'config.json'} names no architecture transformers has "
                                 f"({arch!r}); pass model_class=, e.g. transformers.LlamaForCausalLM")
        with params_on_meta():
            model = model_class(config)
        return model.eval()

    def _read(self, names: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, Tensor]:
        """The tensors ``names`` (with the shape and dtype each must have), each shard opened once and
        read into memory tensor by tensor: not memory-mapped, whose pages of a shard would count
        in the process's memory for as long as the map lives."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out: dict[str, Tensor] = {}
        for path, wanted in by_file.items():
            with open(path, "rb") as f:
                header, start = _header(path, f)
                for n in wanted:
                    entry = header.get(n)
                    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
                        raise ValueError(f"{path}: tensor {n!r} is missing or has a dtype slimkit does not read "
                                         f"({entry.get('dtype') if isinstance(entry, dict) else None!r})")
                    dtype = _DTYPES[entry["dtype"]]
                    begin, stop = entry["data_offsets"]
                    shape, want = names[n]
                    if tuple(entry["shape"]) != tuple(shape):
                        raise ValueError(f"{path}: tensor {n!r} has shape {tuple(entry['shape'])}; the model built "
                                         f"from {self.folder / 'config.json'} expects {tuple(shape)}")
                    buf = torch.empty(stop - begin, dtype=torch.uint8)
                    f.seek(start + begin)
                    if f.readinto(buf.numpy()) != stop - begin:  # type: ignore[arg-type]
                        raise ValueError(f"{path} is truncated: tensor {n!r} ends past the end of the file")
                    t = buf.view(dtype).reshape(shape)
                    out[n] = t if dtype == want else t.to(want)
        return out

    def check(self, model: nn.Module) -> None:
        """That the folder holds every parameter of ``model`` (one name of each shared one), before
        anything is read: a ``KeyError`` naming the first missing one otherwise."""
        holders: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            holders.setdefault(id(p), []).append(name)
        for names in holders.values():
            if not any(n in self.where for n in names):
                parts = names[0].split(".")  # the longest prefix of it the folder holds tensors under
                block = next((".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)
                              if any(n.startswith(".".join(parts[:k]) + ".") for n in self.where)), "")
                raise KeyError(f"{self.folder} holds no tensor {names[0]!r}"
                               + (f" (nor {', '.join(repr(n) for n in names[1:])}, which share it)" if names[1:] else "")
                               + f": its weights do not match {type(model).__name__}" + self._layout_hint(block))

    def load(self, model: nn.Module, prefix: str = "", skip: tuple[str, ...] = (), missing_only: bool = False) -> None:
        """Load, in place, the parameters and persistent buffers of ``model`` under ``prefix`` (all
        when empty), except those under a module of ``skip`` (and, with ``missing_only``, the
        parameters not on ``meta``). A parameter several modules share (tied embeddings) is loaded
        once, from whichever of its names the folder holds."""

        def wanted(name: str) -> bool:
            inside = not prefix or name == prefix or name.startswith(prefix + ".")
            return inside and not any(name == s or name.startswith(s + ".") for s in skip)

        holders: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            holders.setdefault(id(p), []).append(name)
            params[id(p)] = p
        plan: dict[str, tuple[torch.Size, torch.dtype]] = {}
        chosen: dict[int, str] = {}
        for key, names in holders.items():
            if not any(wanted(n) for n in names) or (missing_only and params[key].device.type != "meta"):
                continue
            found = next((n for n in names if n in self.where), None)
            if found is None:
                raise KeyError(f"{self.folder} holds no tensor {names[0]!r}"
                               + (f" (nor {', '.join(repr(n) for n in names[1:])}, which share it)" if names[1:] else "")
                               + f": its weights do not match {type(model).__name__}" + self._layout_hint(prefix))
            p = params[key]
            plan[found] = (p.shape, p.dtype)
            chosen[key] = found
        buffers = {n: b for n, b in model.named_buffers() if wanted(n) and n in self.where
                   and not (missing_only and b.device.type != "meta")}
        for n, b in buffers.items():
            plan[n] = (b.shape, b.dtype)
        tensors = self._read(plan)
        for key, found in chosen.items():
            p = params[key]
            new = type(p)(tensors[found], requires_grad=False)
            for name in holders[key]:
                owner, _, attr = name.rpartition(".")
                model.get_submodule(owner)._parameters[attr] = new
        for n in buffers:
            owner, _, attr = n.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = tensors[n]

    def _layout_hint(self, prefix: str) -> str:
        """Why names may differ: transformers renames or merges some checkpoints' tensors as it loads
        them (mixture-of-experts banks stored expert by expert), which reading by name does not do."""
        import transformers

        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            converts = bool(get_checkpoint_conversion_mapping(self.config().model_type))
        except (ImportError, AttributeError, ValueError):
            converts = False
        theirs = sorted(n for n in self.where if not prefix or n.startswith(prefix + "."))[:4]
        return ((f"; the folder names them {theirs}" if theirs else "")
                + (f". transformers {transformers.__version__} converts this model type's checkpoints as it loads "
                   "them (renamed or merged tensors, such as expert banks stored expert by expert); block by block, "
                   "slimkit reads the model's own names only: load the model and call sk.quantize(model, ...)"
                   if converts else ""))

    def size_bytes(self) -> int:
        """The bytes of the weight files."""
        return sum(p.stat().st_size for p in set(self.where.values()))
