"""MkDocs hooks: the pages' generated parts, so they cannot drift from the code and the results.

- ``{{ presets VERB }}``: the verb's presets, one line each (``slimkit.verbs.DESCRIPTIONS``);
- ``{{ verbs_table }}``: verbs x presets x what each is good for;
- ``{{ cli_help }}``: every subcommand's ``--help``;
- ``{{ benchmark_results }}``: every ``benchmarks/results/*.md``, headings demoted;
- ``{{ quant_passes }}``: every quantization pass (name, stage, fields, what it does);
- ``{{ preset_passes }}``: each quantize preset as the list of passes it is.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _presets(verb: str) -> str:
    from slimkit.verbs import DESCRIPTIONS, PRESET_TABLES

    rows = [f"| `{name}` | {DESCRIPTIONS[verb][name]} |" for name in sorted(PRESET_TABLES[verb][1])]
    return "\n".join(["| preset | what it is, what it is good for |", "|---|---|", *rows])


def _verbs() -> str:
    from slimkit.verbs import DESCRIPTIONS

    calls = {"quantize": "`sk.quantize(model, preset, calib_data=...)`", "qat": "`sk.qat(model, preset, train_data)`",
             "prune": "`sk.prune(model, preset, example_inputs=x, data=...)`",
             "factorize": "`sk.factorize(model, preset, data=...)`", "distill": "`sk.distill(student, teacher, data)`",
             "sparse_train": "`slimkit.prune.sparse_train(model, preset, train_data)`"}
    rows = ["| verb | preset | what it is, what it is good for |", "|---|---|---|"]
    for verb, named in DESCRIPTIONS.items():
        for i, (name, text) in enumerate(sorted(named.items())):
            rows.append(f"| {calls[verb] if i == 0 else ''} | `{name}` | {text} |")
    return "\n".join(rows)


def _cli_help() -> str:
    from slimkit.cli import parser

    p = parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    out = []
    for name, sp in sub.choices.items():  # type: ignore[attr-defined]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            sp.print_help()
        out.append(f"### `slimkit {name}`\n\n```text\n{buf.getvalue().rstrip()}\n```\n")
    return "\n".join(out)


def _benchmarks() -> str:
    parts = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        text = path.read_text()
        text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)
        text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # images live beside the results, not in the site
        parts.append(f"### `benchmarks/results/{path.name}`\n\n{text.strip()}\n")
    return "\n".join(parts)


def _first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").split())
    return text.split(". ")[0].rstrip(".").replace("|", "\\|") + "."


def _quant_passes() -> str:
    import dataclasses

    from slimkit.quant.passes import PASSES

    rows = ["| in a list | stage | fields (defaults) | needs data | what it does |", "|---|---|---|---|---|"]
    for name, cls in PASSES.items():
        fields = ", ".join(f"`{f.name}={f.default!r}`" if f.default is not dataclasses.MISSING else f"`{f.name}`"
                           for f in dataclasses.fields(cls)) or "-"
        rows.append(f"| `{cls.__name__}()` / `\"{name}\"` | {cls.stage} | {fields} | "
                    f"{'yes' if cls.needs_data else 'no'} | {_first_sentence(cls.__doc__)} |")
    return "\n".join(rows)


def _preset_passes() -> str:
    from slimkit.quant.presets import PRESETS

    return "\n".join(["| preset | passes |", "|---|---|",
                      *(f"| `{name}` | `{q}` |" for name, q in sorted(PRESETS.items()))])


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = re.sub(r"\{\{ presets (\w+) \}\}", lambda m: _presets(m.group(1)), markdown)
    if "{{ verbs_table }}" in markdown:
        markdown = markdown.replace("{{ verbs_table }}", _verbs())
    if "{{ cli_help }}" in markdown:
        markdown = markdown.replace("{{ cli_help }}", _cli_help())
    if "{{ benchmark_results }}" in markdown:
        markdown = markdown.replace("{{ benchmark_results }}", _benchmarks())
    if "{{ quant_passes }}" in markdown:
        markdown = markdown.replace("{{ quant_passes }}", _quant_passes())
    if "{{ preset_passes }}" in markdown:
        markdown = markdown.replace("{{ preset_passes }}", _preset_passes())
    return markdown
