"""The docs: they build strictly (broken links and references fail), their examples run, and every
dotted name they mention imports."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))


def test_the_docs_build_strictly(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT,
                         env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stdout + run.stderr
    index = (tmp_path / "site" / "index.html").read_text()
    assert "int8-smoothquant" in index  # the generated verbs table
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "slimkit quantize" in cli and "--weight-bits" in cli  # every command's generated help
    bench = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "benchmarks/results/ptq_real_cnn.md" in bench
    api = (tmp_path / "site" / "reference" / "verbs" / "index.html").read_text()
    assert "slimkit.api.quantize" in api and "&gt;&gt;&gt;" in api  # doctests rendered as code


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_docs_examples_run(page, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_dotted_name_the_docs_mention_imports():
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *PAGES])
    names = set(re.findall(r"\bslimkit(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))
    names |= {"slimkit." + n for n in re.findall(r"\bsk\.([A-Za-z_][A-Za-z0-9_]*)", text)}
    names = {n for n in names if not n.endswith((".py", ".md", ".yaml")) and not n.startswith("slimkit.egg")}
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, missing
