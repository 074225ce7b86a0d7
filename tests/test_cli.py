import json

from slimkit.cli import main


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
