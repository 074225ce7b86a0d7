from pathlib import Path

import pytest

from slimkit.recipe import load_recipe, run_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.stages and recipe.out.name


@pytest.mark.slow
def test_the_digits_recipe_runs(tmp_path):
    results = run_recipe(load_recipe(EXAMPLES / "digits_recipe.yaml", out=str(tmp_path / "run")))
    base, last = results["stages"][0], results["stages"][-1]
    assert last["stage"] == "quantize" and last["size_x"] < 0.12
    assert last["metric"] >= base["metric"] - 1.5
    assert (tmp_path / "run" / "report.html").exists()
