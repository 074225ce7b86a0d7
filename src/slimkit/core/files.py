"""Writing outputs atomically: a reader (or an interrupted run) sees the old file or the new one,
never half of one.

>>> import tempfile, json
>>> from pathlib import Path
>>> d = Path(tempfile.mkdtemp())
>>> write_json(d / "a.json", {"x": 1}); json.loads((d / "a.json").read_text())
{'x': 1}
>>> with atomic_dir(d / "stage") as tmp:
...     _ = (tmp / "f.txt").write_text("done")
>>> (d / "stage" / "f.txt").read_text(), [p.name for p in d.iterdir() if p.name.startswith(".")]
('done', [])
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_json", "atomic_dir", "temp_file", "temp_dir", "user_mode"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(dir: str | os.PathLike[str], prefix: str = "", suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``dir``, with the permissions the user's umask gives a new file
    (``mkstemp`` makes it 0600, which the rename would carry to the output)."""
    fd, path = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    os.chmod(path, 0o666 & ~_umask())
    return fd, path


def user_mode(path: str | os.PathLike[str]) -> None:
    """Give a file a library wrote (safetensors writes 0600) the permissions of the user's umask."""
    os.chmod(path, 0o666 & ~_umask())


def temp_dir(dir: str | os.PathLike[str], prefix: str = "") -> Path:
    """``tempfile.mkdtemp`` in ``dir``, with the permissions the user's umask gives a new folder
    (``mkdtemp`` makes it 0700)."""
    path = tempfile.mkdtemp(dir=dir, prefix=prefix)
    os.chmod(path, 0o777 & ~_umask())
    return Path(path)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """``data`` as indented JSON (anything else as its ``str``), atomically."""
    write_atomic(path, json.dumps(data, indent=1, default=str))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``final`` that replaces it only when the block finishes; on an
    error (or Ctrl-C) it is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final.parent, prefix=f".{final.name}.")
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
