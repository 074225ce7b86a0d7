import json

import pytest
import torch

import slimkit as sk
from slimkit.data import batches
from slimkit.zoo import digits_model


def test_save_load_round_trip_without_pickle(trained_resnet, digits, tmp_path):
    q = sk.quantize(trained_resnet, "int8", calib_data=batches(digits.train_x[:128], None, 64))
    sk.save(q, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "plan.json"]
    q2 = sk.load(tmp_path / "out", digits_model("resnet18"))  # a fresh, untrained base
    x = digits.test_x[:16]
    assert torch.equal(q(x), q2(x))
    [plan] = json.loads((tmp_path / "out" / "plan.json").read_text())["plans"]
    assert plan["config"]["passes"][1] == {"activations": {"mode": "static", "bits": 8, "calibrator": "minmax", "percentile": 99.99, "format": "int", "placement": "onnxruntime"}} and plan["qparams"]


def test_dynamic_and_float_round_trip(trained_mlp, tmp_path):
    for name, model in [("dyn", sk.quantize(trained_mlp, "int8-dynamic")), ("fp", trained_mlp)]:
        sk.save(model, tmp_path / name)
        back = sk.load(tmp_path / name, digits_model("mlp"))
        x = torch.randn(4, 1, 32, 32)
        assert torch.equal(model(x), back(x))


def test_plan_for_another_architecture_is_rejected(trained_mlp, digits, tmp_path):
    q = sk.quantize(trained_mlp, "int8", calib_data=[digits.train_x[:32]])
    sk.save(q, tmp_path / "out")
    with pytest.raises(ValueError, match="does not match|this model does not have"):
        sk.load(tmp_path / "out", digits_model("resnet18"))


def test_missing_and_corrupt_folders(tmp_path, trained_mlp):
    with pytest.raises(FileNotFoundError, match="plan.json is missing"):
        sk.load(tmp_path / "nowhere", digits_model("mlp"))
    sk.save(trained_mlp, tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        sk.load(tmp_path / "out", digits_model("mlp"))
    (tmp_path / "out" / "plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="plan.json is corrupt"):
        sk.load(tmp_path / "out", digits_model("mlp"))


def test_save_never_overwrites_a_foreign_folder(trained_mlp, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        sk.save(trained_mlp, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_saved_plan_of_unknown_kind_or_with_bad_fields_is_named(trained_mlp, tmp_path):
    q = sk.quantize(trained_mlp, "int8-dynamic")
    sk.save(q, tmp_path / "q")
    path = tmp_path / "q" / "plan.json"
    doc = json.loads(path.read_text())
    for plan, message in (({"kind": "sparsify"}, r"plan 1 of 1 \('sparsify'\): unknown plan kind 'sparsify'.*known: "
                                                 r"lowrank, prune, quant"),
                          ({**doc["plans"][0], "config": {"passes": [{"gptq": {"damp": 0}}]}},
                           r"plan 1 of 1 \('quant'\): the saved quantization plan is invalid: pass 0 \(gptq\): damp")):
        path.write_text(json.dumps({**doc, "plans": [plan]}))
        with pytest.raises(ValueError, match=message):
            sk.load(tmp_path / "q", digits_model("mlp"))
