"""The user's data, named on the command line: calibration, training and evaluation batches from

- ``package.module:function`` (or ``path/to/file.py:function``): what the function returns, a tensor
  of inputs, an ``(inputs, labels)`` pair of tensors, a mapping with ``inputs`` (or ``x``) and
  optionally ``labels`` (or ``y``), or a list of batches as the model is called with;
- a ``.npy`` file (inputs), an ``.npz``, ``.pt`` / ``.pth`` (loaded with ``weights_only=True``) or
  ``.safetensors`` file holding one tensor (inputs) or ``inputs`` / ``labels`` (``x`` / ``y``);
- a folder of images (``.png``, ``.jpg``, ...), RGB in [0, 1] as N x 3 x H x W, resized to
  ``image_size`` when given, with the names of sub-folders as labels (the ``ImageFolder`` layout);
- a text file, one example per line, tokenized with the tokenizer of the Hugging Face model folder;
- ``digits``: the bundled 8x8 digits upscaled to 32x32 (what the zoo models take).

The input shape comes from the data, never from a default. Nothing is unpickled.

>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
>>> np.save(path, np.zeros((10, 4), dtype=np.float64))
>>> d = load_data(path, batch_size=4)
>>> [tuple(b.shape) for b in d.inputs], d.inputs[0].dtype, d.labels is None
([(4, 4), (4, 4), (2, 4)], torch.float32, True)
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimkit.core.batch import Batch

__all__ = ["UserData", "load_data", "import_object", "first_samples", "batch_len", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_INPUT_KEYS = ("inputs", "x")
_LABEL_KEYS = ("labels", "y")


@dataclass
class UserData:
    """Input batches, with their labels when the data has them (one tensor per batch)."""

    inputs: list[Batch]
    labels: list[Tensor] | None
    source: str

    def pairs(self) -> list[tuple[Batch, Tensor]]:
        """``(inputs, labels)`` batches, for training on labels."""
        if self.labels is None:
            raise ValueError(f"{self.source} holds no labels; training on it needs (inputs, labels)")
        return list(zip(self.inputs, self.labels, strict=True))

    def example(self, n: int = 2) -> Batch:
        """The first ``n`` samples of the first batch: the export's example inputs."""
        return _head(self.inputs[0], n)

    def train(self) -> list[Any]:
        """What fine-tuning takes: pairs with labels, else the input batches."""
        return self.pairs() if self.labels is not None else list(self.inputs)


def _head(batch: Any, n: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: _head(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_head(v, n) for v in batch)
    return batch


def import_object(spec: str, what: str) -> Any:
    """``package.module:name`` or ``path/to/file.py:name``; the current folder is importable, as
    ``python -c`` would have it."""
    if ":" not in spec:
        raise ValueError(f"{what} must be given as package.module:name or file.py:name, got {spec!r}")
    mod, _, attr = spec.rpartition(":")
    try:
        if mod.endswith(".py"):
            path = Path(mod)
            if not path.is_file():
                raise ValueError(f"{what} {spec!r}: {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules.setdefault(path.stem, module)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"cannot import {spec!r}: {e} (the module must be importable from the current "
                         f"folder {os.getcwd()} or installed)") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"cannot import {spec!r}: module {mod!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def _tensor(v: Any, where: str) -> Tensor:
    import numpy as np

    if isinstance(v, np.ndarray):
        v = torch.from_numpy(np.ascontiguousarray(v))
    if not isinstance(v, Tensor):
        raise ValueError(f"{where}: expected an array or a tensor, got {type(v).__name__}")
    return v.float() if v.is_floating_point() else v


def _split(x: Tensor, y: Tensor | None, batch_size: int, source: str) -> UserData:
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"{source}: the inputs are empty (shape {list(x.shape)})")
    if y is not None and len(y) != len(x):
        raise ValueError(f"{source}: {len(x)} inputs but {len(y)} labels")
    xs = list(x.split(batch_size))
    return UserData(xs, list(y.split(batch_size)) if y is not None else None, source)


def _from_mapping(d: Mapping[str, Any], batch_size: int, source: str) -> UserData:
    keys = list(d)
    xk = next((k for k in _INPUT_KEYS if k in d), None)
    yk = next((k for k in _LABEL_KEYS if k in d), None)
    if xk is None:
        if len(d) == 1:
            return _split(_tensor(d[keys[0]], source), None, batch_size, source)
        raise ValueError(f"{source} holds {keys}; name the inputs 'inputs' (or 'x') and the labels 'labels' (or 'y')")
    return _split(_tensor(d[xk], f"{source}[{xk!r}]"), _tensor(d[yk], f"{source}[{yk!r}]") if yk else None,
                  batch_size, source)


def _from_object(obj: Any, batch_size: int, source: str) -> UserData:
    import numpy as np

    if isinstance(obj, (Tensor, np.ndarray)):
        return _split(_tensor(obj, source), None, batch_size, source)
    if isinstance(obj, Mapping):
        return _from_mapping(obj, batch_size, source)
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(v, (Tensor, np.ndarray)) for v in obj) \
            and len(obj[0]) == len(obj[1]) and not _tensor(obj[1], source).is_floating_point():
        return _split(_tensor(obj[0], source), _tensor(obj[1], source), batch_size, source)
    try:
        items = list(obj)
    except TypeError:
        raise ValueError(f"{source} gave a {type(obj).__name__}; give a tensor, an (inputs, labels) pair, a mapping "
                         "with 'inputs' and 'labels', or a list of batches") from None
    if not items:
        raise ValueError(f"{source} gave no batches")
    pairs = all(isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], Tensor)
                and not b[1].is_floating_point() for b in items)
    if pairs:
        return UserData([b[0] for b in items], [b[1] for b in items], source)
    return UserData(items, None, source)


def _images(folder: Path, batch_size: int, image_size: tuple[int, int] | None) -> UserData:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.parent.relative_to(folder).parts[0] for p in files if p.parent != folder})
    arrays, labels = [], []
    for p in files:
        try:
            with Image.open(p) as opened:
                im = opened.convert("RGB")
                if image_size is not None:
                    im = im.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{p}: not an image PIL can read ({e})") from e
        if classes:
            labels.append(classes.index(p.parent.relative_to(folder).parts[0]) if p.parent != folder else -1)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: the images have different sizes {sorted(shapes)[:3]}...; give --image-size H,W")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels) if classes and -1 not in labels else None
    log.info("%s: %d images of %dx%d%s", folder, len(x), x.shape[2], x.shape[3],
             f", {len(classes)} classes from the sub-folders" if y is not None else "")
    return _split(x, y, batch_size, str(folder))


def _text(path: Path, batch_size: int, model_folder: Path | None, max_length: int) -> UserData:
    if model_folder is None:
        raise ValueError(f"{path}: text data needs a Hugging Face model folder (with its tokenizer) as the model")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_folder}: no tokenizer to read {path} with ({e})") from e
    lines = [s.strip() for s in path.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
    if not lines:
        raise ValueError(f"{path} holds no text")
    out: list[Batch] = []
    for i in range(0, len(lines), batch_size):
        enc = tok(lines[i: i + batch_size], padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return UserData(out, None, str(path))


def load_data(spec: str, batch_size: int = 32, model_folder: str | os.PathLike[str] | None = None,
              image_size: tuple[int, int] | None = None, max_length: int = 128, limit: int | None = None,
              split: str = "train") -> UserData:
    """The batches ``spec`` names (see the module's doc); ``limit`` keeps the first samples.
    ``split`` picks the bundled digits' ``train`` or ``test`` images (other data has one split)."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    if spec == "digits":
        from slimkit.data import load_digits32

        d = load_digits32()
        x, y = (d.train_x, d.train_y) if split == "train" else (d.test_x, d.test_y)
        data = _split(x, y, batch_size, "digits")
    else:
        path = Path(spec)
        if path.is_dir():
            data = _images(path, batch_size, image_size)
        elif path.suffix.lower() in (".npy", ".npz", ".pt", ".pth", ".safetensors", ".txt", ".text"):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            data = _from_file(path, batch_size, model_folder, max_length)
        elif ":" in spec:
            got = import_object(spec, "data")
            data = _from_object(got() if callable(got) else got, batch_size, spec)
        else:
            raise ValueError(f"data {spec!r}: give a .npy/.npz/.pt/.safetensors file, a folder of images, a text file, "
                             "package.module:function or 'digits'")
    if limit is not None:
        data = first_samples(data, limit)
    return data


def _from_file(path: Path, batch_size: int, model_folder: Any, max_length: int) -> UserData:
    import numpy as np

    suffix = path.suffix.lower()
    if suffix in (".txt", ".text"):
        return _text(path, batch_size, Path(model_folder) if model_folder else None, max_length)
    try:
        if suffix == ".npy":
            return _split(_tensor(np.load(path, allow_pickle=False), str(path)), None, batch_size, str(path))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return _from_mapping({k: z[k] for k in z.files}, batch_size, str(path))
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _from_mapping(load_file(str(path)), batch_size, str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, OSError, RuntimeError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read it as {suffix} data ({str(e).splitlines()[0] if str(e) else e!r})") from e
    except Exception as e:  # torch.load's UnpicklingError for a file that is not weights-only
        raise ValueError(f"{path}: cannot read it as {suffix} data with weights_only=True ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); save tensors, a tuple or a dict of them") from e
    return _from_object(obj, batch_size, str(path))


def first_samples(data: UserData, n: int) -> UserData:
    """``data`` cut to its first ``n`` samples (the last batch shortened)."""
    inputs, labels, seen = [], [], 0
    for i, b in enumerate(data.inputs):
        if seen >= n:
            break
        size = batch_len(b)
        take = min(size, n - seen)
        inputs.append(_head(b, take))
        if data.labels is not None:
            labels.append(data.labels[i][:take])
        seen += take
    return UserData(inputs, labels if data.labels is not None else None, data.source)


def batch_len(b: Any) -> int:
    """How many samples a batch holds (its first tensor's first axis)."""
    from slimkit.core.batch import tensors_of

    ts = tensors_of(b)
    return len(ts[0]) if ts and ts[0].ndim else 1
