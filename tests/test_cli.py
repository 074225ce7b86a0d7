import json
import re

from slimkit.cli import main
from slimkit.zoo import digits_model


def test_presets(capsys):
    from slimkit.verbs import DESCRIPTIONS
    from slimkit.verbs import PRESET_TABLES as VERBS

    assert main(["presets", "--json"]) == 0
    assert "int8-dynamic" in json.loads(capsys.readouterr().out)["quantize"]
    assert main(["presets", "prune"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(VERBS["prune"][1]) and lines[0].split()[0] == "2:4" and "N:M" in lines[0]
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for verb, (_, named) in VERBS.items():  # one described line per preset, every verb
        assert set(DESCRIPTIONS[verb]) == set(named), verb
        assert f"{verb}:" in out and all(f"  {n} " in out for n in named)
    assert main(["presets", "quantise"]) == 2
    assert "one of quantize" in capsys.readouterr().err


def test_a_preset_name_with_a_qualifier_suggests_the_preset_it_starts_with(tmp_path, capsys):
    rc = main(["quantize", "slimkit.zoo:digits_model", "--factory-arg", "mlp", "--preset", "int8-static",
               "--out", str(tmp_path / "q")])
    assert rc == 2 and "(did you mean 'int8'?)" in capsys.readouterr().err


def test_quantize_command(tmp_path, trained_mlp, capsys):
    from safetensors.torch import save_file

    ckpt = tmp_path / "w.safetensors"
    save_file(trained_mlp.state_dict(), str(ckpt))
    rc = main(["quantize", "slimkit.zoo:digits_model", "--factory-arg", "mlp", "--checkpoint", str(ckpt),
               "--out", str(tmp_path / "q")])
    assert rc == 0 and (tmp_path / "q" / "plan.json").exists() and (tmp_path / "q" / "model.onnx").exists()
    assert "parity" in capsys.readouterr().out


def test_bad_factory_exits_2_with_a_message(tmp_path, capsys):
    assert main(["quantize", "no.such.module:f", "--out", str(tmp_path / "q")]) == 2
    assert "cannot import 'no.such.module:f'" in capsys.readouterr().err
    assert main(["quantize", "slimkit.zoo:digits_model", "--factory-arg", "mlp", "--preset", "int7",
                 "--out", str(tmp_path / "q")]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_demo_tells_the_whole_story_and_writes_the_report(tmp_path, capsys):
    assert main(["demo", "--model", "mlp", "--out", str(tmp_path), "--tune-budget", "5"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["stage"] for r in res["stages"]] == ["baseline", "quantize", "prune + distill", "prune + distill + quantize",
                                                   "tune"]
    assert res["peers"][0]["label"] == "ORT quantize_static"
    fp32, int8 = res["stages"][0], res["stages"][1]
    assert int8["size_x"] < 0.3 and res["lint"]["issues"] == []
    assert int8["metric"] > fp32["metric"] - 1.0
    assert res["stages"][-1]["metric"] >= fp32["metric"] - 1.0 - 0.6  # the tuner's pick, re-measured
    for f in ("report.html", "report.md", "results.md", "tuner/best/model.onnx"):
        assert (tmp_path / f).exists(), f
    out = capsys.readouterr().out
    assert "| slimkit int8 |" in out and "the tuner" in out and str(tmp_path.resolve() / "report.html") in out


def test_factorize_command_with_finetune(tmp_path, trained_mlp, capsys):
    import slimkit as sk

    out = tmp_path / "f"
    rc = main(["factorize", "slimkit.zoo:trained", "--factory-arg", "mlp", "--ratio", "0.5",
               "--finetune", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and (out / "model.onnx").exists(), text
    assert "| 1 |" in text and "after 1 epochs of fine-tuning with distillation" in text
    lines = [t for t in text.splitlines() if t.startswith("accuracy on digits")]
    acc = [[float(v) for v in re.findall(r"(\d+\.\d+)%", line)] for line in lines]
    assert len(acc) == 2 and acc[0][0] == acc[1][0] and acc[1][1] > 90  # factorized, then fine-tuned
    loaded = sk.load(out, digits_model("mlp"))
    assert loaded.slimkit_plan.ranks_ == {"1": [102], "3": [42], "5": [4]}


def test_factorize_command_bad_input(tmp_path, capsys):
    args = ["factorize", "slimkit.zoo:trained", "--factory-arg", "mlp", "--out", str(tmp_path / "f")]
    assert main(args + ["--energy", "1.5"]) == 2
    assert "energy" in capsys.readouterr().err
    assert main(args + ["--ratio", "0.5", "--layers", "1,9"]) == 2
    assert "no module named '9'" in capsys.readouterr().err
    assert main(args + ["--ratio", "0.5", "--method", "tucker", "--whiten"]) == 2
    assert "whiten applies to method 'svd'" in capsys.readouterr().err
    assert main(args + ["--ratio", "0.5", "--data", "imagenet"]) == 2
    assert "data 'imagenet': give a .npy" in capsys.readouterr().err


def test_prune_command(tmp_path, trained_resnet, capsys):
    import slimkit as sk

    out = tmp_path / "p"
    rc = main(["prune", "slimkit.zoo:trained", "--factory-arg", "resnet18", "--sparsity", "0.5", "--round-to", "4",
               "--finetune", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and (out / "model.onnx").exists(), text
    kept = float(re.search(r"parameters \d+ -> \d+ \((\d+\.\d+)%\)", text).group(1))
    lines = [t for t in text.splitlines() if t.startswith("accuracy on digits")]
    acc = [[float(v) for v in re.findall(r"(\d+\.\d+)%", line)] for line in lines]
    assert kept < 60 and len(acc) == 2 and acc[1][1] > 90, text  # pruned, then fine-tuned
    loaded = sk.load(out, digits_model("resnet18"))
    assert loaded.stem[0].out_channels == 8
    assert main(["prune", "slimkit.zoo:trained", "--factory-arg", "mlp", "--method", "unstructured",
                 "--sparsity", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "sparsity must be in" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "slimkit run examples/digits_recipe.yaml" in out
    for cmd in ("run", "quantize", "prune", "factorize", "distill", "bench", "lint", "report", "demo", "presets"):
        assert f"{{{cmd}," in out or f",{cmd}," in out or f",{cmd}}}" in out
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert f"example:\n  slimkit {cmd}" in capsys.readouterr().out, cmd


def test_bench_and_lint_commands(tmp_path, trained_mlp, digits, capsys, caplog):
    import slimkit as sk
    from slimkit.data import batches

    fp32 = sk.export_onnx(trained_mlp, tmp_path / "fp32.onnx", digits.test_x[:8]).path
    q = sk.quantize(trained_mlp, "int8", calib_data=batches(digits.train_x[:128], None, 32))
    int8 = sk.export_onnx(q, tmp_path / "int8.onnx", digits.test_x[:8]).path
    js = tmp_path / "bench.json"
    assert main(["bench", fp32, int8, "--data", "digits", "--runs", "20", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert rows[0]["rel_l2"] == 0.0 and rows[0]["top1_agreement"] == 100.0
    assert 0 < rows[1]["rel_l2"] < 0.1 and rows[1]["top1_agreement"] > 97 and rows[1]["size_kb"] < 0.3 * rows[0]["size_kb"]
    assert "| " + int8 + " |" in capsys.readouterr().out
    assert main(["bench", fp32, "--input-shape", "2,1,32,32", "--runs", "10"]) == 0
    assert main(["bench", fp32, str(tmp_path / "missing.onnx"), "--data", "digits"]) == 2
    assert "missing.onnx does not exist" in capsys.readouterr().err
    assert main(["bench", fp32, "--runs", "10"]) == 0  # random inputs of the file's own shapes, said
    assert "random inputs of the file's own shapes (input [8, 1, 32, 32])" in caplog.text
    assert main(["bench", fp32, "--input-shape", "2,3,32,32"]) == 2
    assert "input 'input' has shape ['batch', 1, 32, 32]" in capsys.readouterr().err
    assert main(["lint", int8]) == 0
    assert json.loads(capsys.readouterr().out)["integer_ops"]


def test_lint_command_exits_1_when_it_finds_float_ops_between_quantized_ones(tmp_path, trained_mlp, digits, capsys):
    import slimkit as sk
    from slimkit.data import batches

    q = sk.quantize(trained_mlp, {"exclude": ["3"]}, calib_data=batches(digits.train_x[:128], None, 32))
    path = sk.export_onnx(q, tmp_path / "partly.onnx", digits.test_x[:8]).path
    assert main(["lint", path]) == 1
    assert json.loads(capsys.readouterr().out)["issues"]


def test_distill_command(tmp_path, capsys):
    rc = main(["distill", "slimkit.zoo:digits_model", "--factory-arg", "mlp", "--teacher", "slimkit.zoo:trained",
               "--teacher-arg", "mlp", "--epochs", "1", "--out", str(tmp_path / "d")])
    assert rc == 0 and (tmp_path / "d" / "model.onnx").exists()
    out = capsys.readouterr().out
    acc = float(re.search(r"accuracy on digits: original [\d.]+%, student ([\d.]+)%", out).group(1))
    assert acc > 85  # one epoch of distillation from the trained MLP teaches a fresh one
