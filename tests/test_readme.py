import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README should hold a Python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "out/readme/int8.onnx").exists() and (tmp_path / "out/readme/int8/plan.json").exists()


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block


def test_readme_fits_on_about_two_screens_and_its_table_names_every_preset():
    from slimkit.verbs import VERBS

    text = README.read_text()
    assert len(text.splitlines()) <= 90 and len(text.split()) <= 1000
    table = text.split("## What there is", 1)[1].split("\n\n", 2)[1]
    for verb, (_, named) in VERBS.items():
        row = [line for line in table.splitlines() if f"`sk.{verb}`" in line]
        assert row, verb
        for name in named:
            assert f"`{name}`" in table, (verb, name)
