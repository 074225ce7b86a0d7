"""A griffe extension for the API reference: doctest examples in the docstrings become ``pycon``
code blocks (in plain markdown, ``>>>`` lines would be read as quotes and ``[x for x in y]`` as links)."""

from __future__ import annotations

from typing import Any

import griffe


def fence(text: str) -> str:
    """Every run of lines from a ``>>>`` line to the next blank line, fenced."""
    out: list[str] = []
    block: list[str] = []
    indent = ""
    for line in [*text.split("\n"), ""]:
        if block and not line.strip():
            out += [f"{indent}```pycon", *block, f"{indent}```"]
            block = []
        if block:
            block.append(line)
            continue
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            block = [line]
            continue
        out.append(line)
    return "\n".join(out[:-1] if out and out[-1] == "" and not text.endswith("\n") else out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence(obj.docstring.value)
