import json
import re

from slimkit.cli import main
from slimkit.zoo import digits_model


def test_presets(capsys):
    assert main(["presets"]) == 0
    assert "int8-dynamic" in json.loads(capsys.readouterr().out)


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


def test_demo_writes_its_table(tmp_path, capsys):
    assert main(["demo", "--model", "mlp", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in res["rows"]] == ["FP32", "slimkit int8", "ORT quantize_static"]
    assert res["rows"][1]["size_x"] < 0.3 and res["lint"]["issues"] == []
    assert "| slimkit int8 |" in capsys.readouterr().out


def test_factorize_command_with_finetune(tmp_path, trained_mlp, capsys):
    import slimkit as sk

    out = tmp_path / "f"
    rc = main(["factorize", "slimkit.zoo:trained", "--factory-arg", "mlp", "--ratio", "0.5",
               "--finetune", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and (out / "model.onnx").exists(), text
    assert "| 1 |" in text and "after 1 epochs of fine-tuning with distillation" in text
    line = next(t for t in text.splitlines() if t.startswith("accuracy on digits"))
    acc = [float(v) for v in re.findall(r"(\d+\.\d+)%", line)]
    assert len(acc) == 3 and acc[2] > 90  # original, factorized, fine-tuned
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
    assert "--data supports 'digits'" in capsys.readouterr().err


def test_prune_command(tmp_path, trained_resnet, capsys):
    import slimkit as sk

    out = tmp_path / "p"
    rc = main(["prune", "slimkit.zoo:trained", "--factory-arg", "resnet18", "--sparsity", "0.5", "--round-to", "4",
               "--finetune", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and (out / "model.onnx").exists(), text
    line = next(t for t in text.splitlines() if t.startswith("parameters"))
    acc = [float(v) for v in re.findall(r"(\d+\.\d+)%", line)]
    assert len(acc) == 4 and acc[3] > 90, line  # kept fraction, original, pruned, fine-tuned
    loaded = sk.load(out, digits_model("resnet18"))
    assert loaded.stem[0].out_channels == 8
    assert main(["prune", "slimkit.zoo:trained", "--factory-arg", "mlp", "--method", "unstructured",
                 "--sparsity", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "sparsity must be in" in capsys.readouterr().err
