"""An English text corpus that ships with Python itself: the docstrings of the standard library.

Sentences are the first paragraphs of the docstrings of a fixed list of modules, their classes and
functions, whitespace-collapsed, deduplicated and shuffled under a seed, so the corpus is the same
on every machine with the same Python minor version.

>>> s = docstring_sentences(50)
>>> len(s), all(isinstance(t, str) and len(t) >= 20 for t in s)
(50, True)
>>> docstring_sentences(50) == s
True
"""

from __future__ import annotations

import importlib
import inspect
import random

__all__ = ["docstring_sentences", "MODULES"]

MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
           "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
           "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
           "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math", "mimetypes",
           "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "shlex",
           "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
           "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "typing",
           "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zlib")


def _paragraphs(doc: object, every: bool) -> list[str]:
    if not isinstance(doc, str) or not doc:
        return []
    paras = [" ".join(p.split()) for p in doc.strip().split("\n\n")]
    return [p for p in (paras if every else paras[:1])
            if 20 <= len(p) <= 600 and not p.startswith((">>>", "..", "-", "*", ":")) and any(c.isalpha() for c in p)]


def docstring_sentences(n: int | None = None, seed: int = 0, min_chars: int = 20, every_paragraph: bool = False) -> list[str]:
    """Up to ``n`` distinct first paragraphs of standard-library docstrings (all when ``n`` is None);
    ``every_paragraph`` takes every prose paragraph, not just the first (about three times the text)."""
    seen: dict[str, None] = {}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a stripped-down Python; the corpus just gets smaller
            continue
        objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_")
                        and (inspect.isclass(v) or inspect.isroutine(v))]
        for obj in objs:
            for o in [obj] + ([v for k, v in sorted(vars(obj).items()) if not k.startswith("_")
                               and inspect.isroutine(v)] if inspect.isclass(obj) else []):
                for p in _paragraphs(getattr(o, "__doc__", None), every_paragraph):
                    if len(p) >= min_chars:
                        seen[p] = None
    out = sorted(seen)
    random.Random(seed).shuffle(out)
    if n is not None and n > len(out):
        raise ValueError(f"asked for {n} docstring sentences; this Python has {len(out)}")
    return out if n is None else out[:n]
