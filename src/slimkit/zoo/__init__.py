"""Reference models, and digits-trained versions of them.

``trained("resnet18")`` builds the small digits variant and loads the weights shipped with slimkit
(``zoo/weights/``, trained once with ``store_shipped``), so every machine gets the same bits: a model
trained on first use would differ from one CPU to the next, with everything computed from it. Another
``seed`` trains the model (well under a minute on two cores) and caches it as safetensors under
``$SLIMKIT_CACHE`` (default ``~/.cache/slimkit``); later calls load the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core.files import temp_file, user_mode

from .mixed import mixed_cnn
from .mlp import mlp
from .mobilenet import mobilenet_v2
from .resnet import resnet18

__all__ = ["resnet18", "mobilenet_v2", "mlp", "mixed_cnn", "digits_model", "trained", "train", "store_shipped",
           "DIGITS_MODELS", "cache_dir", "load_cached", "store_cached"]

log = logging.getLogger(__name__)

# The digits (1x32x32) variants: factory and training epochs.
DIGITS_MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: resnet18(width=16, in_channels=1, small_input=True), 6),
    "mobilenet_v2": (lambda: mobilenet_v2(width_mult=0.5, in_channels=1, small_input=True), 5),
    "mlp": (lambda: mlp(), 10),
    "mixed_cnn": (lambda: mixed_cnn(), 4),  # grouped conv, squeeze-excite, concat, residual, flatten
}


def digits_model(name: str) -> nn.Module:
    """A freshly built (untrained) digits variant of a zoo model."""
    if name not in DIGITS_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(DIGITS_MODELS)}")
    return DIGITS_MODELS[name][0]()


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMKIT_CACHE", Path.home() / ".cache" / "slimkit"))


SHIPPED = Path(__file__).parent / "weights"  # seed 0 of every DIGITS_MODELS entry


def trained(name: str, seed: int = 0) -> nn.Module:
    """The digits-trained model ``name``: the shipped weights for seed 0, else trained and cached on first use."""
    model = digits_model(name)
    shipped = SHIPPED / f"{name}.safetensors"
    if seed == 0 and shipped.exists():
        model.load_state_dict(load_file(str(shipped)))
        return model.eval()
    # the CPU kernels PyTorch runs (AVX2, AVX-512, ...) sum in different orders: trained weights differ with them
    kernels = torch.backends.cpu.get_cpu_capability()
    key = hashlib.sha256(f"{name}-{seed}-{torch.__version__}-{kernels}-v1".encode()).hexdigest()[:12]
    path = cache_dir() / "zoo" / f"{name}-{key}.safetensors"
    if load_cached(path, model):
        return model.eval()
    from slimkit.core.progress import log as progress

    progress.info("zoo: training %s on the digits (first use, %d epochs; cached in %s)", name, DIGITS_MODELS[name][1],
                  path.parent)
    model = train(name, seed)
    store_cached(path, model.state_dict())
    return model.eval()


def train(name: str, seed: int = 0) -> nn.Module:
    """Train the digits variant of ``name`` from scratch (its DIGITS_MODELS epochs, SGD at 0.05, batch 32)."""
    from slimkit.data import batches, load_digits32
    from slimkit.train import accuracy, fit

    d = load_digits32()
    torch.manual_seed(seed)
    model = digits_model(name)
    fit(model, batches(d.train_x, d.train_y, 32), epochs=DIGITS_MODELS[name][1], lr=0.05, seed=seed)
    log.info("trained %s on digits: test accuracy %.2f%%", name, accuracy(model, d.test_x, d.test_y))
    return model.eval()


def store_shipped(names: list[str] | None = None) -> None:
    """Re-train seed 0 of the digits models (all by default) and write them as the shipped weights.
    Everything stored from them (the preset references, the benchmarks) changes with them."""
    for name in names or list(DIGITS_MODELS):
        store_cached(SHIPPED / f"{name}.safetensors", train(name, 0).state_dict())


def load_cached(path: Path, model: nn.Module, fix: Callable[[dict[str, Any]], None] | None = None) -> bool:
    """Load the cached weights at ``path`` into ``model`` (``fix`` may complete the state first, e.g.
    a tied table stored once); False when there is none, or it is unreadable (then rebuilt, not trusted)."""
    if not path.exists():
        return False
    try:
        state = load_file(str(path))
        if fix is not None:
            fix(state)
        model.load_state_dict(state)
        return True
    except Exception as e:  # a corrupt cache is rebuilt, not trusted
        log.warning("ignoring unreadable cache %s: %s", path, e)
        return False


def store_cached(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as safetensors at ``path``, atomically, readable by the user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent)
    os.close(fd)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    user_mode(tmp)
    os.replace(tmp, path)
