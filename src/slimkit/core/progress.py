"""Progress on long work, on a terminal or not: a tqdm bar on a terminal; otherwise a log line
(logger ``slimkit.progress``, level INFO) every ``SLIMKIT_PROGRESS_SECONDS`` (default 10) seconds
and one when work that took that long ends, so a CI log or a redirected run shows it is alive.
The command line shows these lines without ``-v``.

>>> import logging
>>> seen = []
>>> handler = logging.Handler(); handler.emit = lambda r: seen.append(r.getMessage())
>>> logging.getLogger("slimkit.progress").addHandler(handler)
>>> logging.getLogger("slimkit.progress").setLevel(logging.INFO)
>>> sum(progress(range(3), desc="counting", every=0.0, tty=False))
3
>>> seen[-1]
'counting: 3/3 (100%), 0 s'
>>> logging.getLogger("slimkit.progress").removeHandler(handler)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

__all__ = ["progress", "log"]

log = logging.getLogger("slimkit.progress")


def _interval() -> float:
    try:
        return float(os.environ.get("SLIMKIT_PROGRESS_SECONDS", "10"))
    except ValueError:
        return 10.0


class progress:  # noqa: N801 (used like tqdm)
    """``tqdm``'s interface (iterate, ``update``, ``set_postfix_str``, ``close``) for either form."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, unit: str = "it", leave: bool = False, every: float | None = None,
                 tty: bool | None = None, disable: bool = False) -> None:
        self.iterable = iterable
        self.tty = sys.stderr.isatty() if tty is None else tty
        if disable:  # another rank's copy of the work: silent
            self.tty, every = False, float("inf")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.n, self.postfix = total, desc, initial, ""
        self.every = _interval() if every is None else every
        self.t0 = self.last = time.monotonic()
        self.bar = tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, leave=leave) if self.tty else None

    def __iter__(self) -> Iterator[Any]:
        if self.bar is not None:
            yield from self.bar
            return
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.t0
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        post = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}, {elapsed:.0f} s{post}"

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
            return
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every and (self.total is None or self.n < self.total):
            self.last = now
            log.info(self._line())

    def set_postfix_str(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        self.postfix = text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            return
        if self.t0 is not None and time.monotonic() - self.t0 >= self.every:
            log.info(self._line())
        self.t0 = None  # type: ignore[assignment]  # once
