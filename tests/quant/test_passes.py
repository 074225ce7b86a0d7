"""Quantization as an ordered list of passes: each pass validates itself and its fit with the others,
runs in the order written, is recorded in the plan (so ``sk.load`` replays it), and a new one takes
one config class and one handler. The old flat config translates, with a deprecation warning."""

import argparse
import json
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.quant import (
    AWQ,
    GPTQ,
    PRESETS,
    Activations,
    AdaRound,
    BiasCorrection,
    Embeddings,
    Equalize,
    KeepFloat,
    OutlierChannels,
    Quantize,
    QuantPass,
    SmoothQuant,
    Weights,
    pass_handler,
    quant_pass,
)
from slimkit.quant.passes import PASSES

# The presets as the old flat dicts gave them: each must translate to the named list it became.
OLD_PRESETS = {
    "int8": {"quantize_embeddings": True, "bias_correction": True},
    "int8-dynamic": {"activations": "dynamic", "quantize_embeddings": True},
    "int8-smoothquant": {"activations": "dynamic", "smooth_alpha": 0.5, "outlier_threshold": 8.0,
                         "quantize_embeddings": True},
    "int8-percentile": {"calibrator": "percentile"},
    "int8-entropy": {"calibrator": "entropy"},
    "int8-cle": {"equalize": True, "bias_correction": True},
    "w4a8": {"weight_bits": 4, "reduce_range": False, "weight_grid": "output", "bias_correction": True,
             "int8_layers": ["first", "last", "depthwise"]},
    "w4a8-adaround": {"weight_bits": 4, "reduce_range": False, "weight_grid": "mse", "bias_correction": True,
                      "rounding": "adaround", "adaround_iterations": 300, "int8_layers": ["first", "last", "depthwise"]},
    "int4-weight": {"activations": "none", "weight_bits": 4, "reduce_range": False, "group_size": 128,
                    "quantize_embeddings": True},
    "int4-gptq": {"activations": "none", "weight_bits": 4, "reduce_range": False, "group_size": 128,
                  "rounding": "gptq", "quantize_embeddings": True},
    "int4-awq": {"activations": "none", "weight_bits": 4, "reduce_range": False, "group_size": 128, "rounding": "awq",
                 "quantize_embeddings": True},
}


# what changed since, deliberately (benchmarks/results/ptq_real_cnn.md, int4_presets.md): the old forms, as passes
_OLD_INT4 = [Weights(bits=4, reduce_range=False, group_size=128), Activations(mode="none")]
CHANGED = {"int8": PRESETS["int8"].with_pass(BiasCorrection()),
           "w4a8-adaround": PRESETS["w4a8-adaround"].with_pass(AdaRound(iterations=300)),
           "int4-weight": Quantize.of([*_OLD_INT4, Embeddings()]),
           "int4-gptq": Quantize.of([*_OLD_INT4, GPTQ(), Embeddings()]),
           "int4-awq": Quantize.of([*_OLD_INT4, AWQ(), Embeddings()])}


@pytest.mark.parametrize("name", sorted(OLD_PRESETS))
def test_each_old_flat_preset_translates_to_its_named_list(name):
    assert sk.QuantConfig.from_dict(OLD_PRESETS[name]).to_passes() == CHANGED.get(name, PRESETS[name])


def test_old_dicts_still_quantize_the_same_with_a_warning_showing_the_new_form(trained_mlp, digits):
    calib = batches(digits.train_x[:128], None, 64)
    with pytest.warns(DeprecationWarning, match=r"\[\{'weights': \{'bits': 4"):
        old = sk.quantize(trained_mlp, OLD_PRESETS["int4-gptq"], calib_data=calib)
    new = sk.quantize(trained_mlp, CHANGED["int4-gptq"].to_dict(), calib_data=calib)  # the old preset, as passes
    for k, v in new.state_dict().items():
        assert torch.equal(old.state_dict()[k], v), k
    assert old.slimkit_plan.config == new.slimkit_plan.config == CHANGED["int4-gptq"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new forms do not warn
        for spec in ("int4-gptq", PRESETS["int4-gptq"], PRESETS["int4-gptq"].to_dict(),
                     [{"weights": {"bits": 4, "group_size": 128, "reduce_range": False}}, {"activations": {"mode": "none"}},
                      {"gptq": {"act_order": True}}, "embeddings"]):
            assert sk.quant.resolve_quantize(spec) == PRESETS["int4-gptq"]


def test_lists_of_names_and_dicts_build_the_same_passes():
    q = Quantize.of(["weights", {"activations": {"mode": "dynamic"}}, {"smoothquant": {"alpha": 0.7}}, "outlier_channels"])
    assert q == Quantize.of([Weights(), Activations(mode="dynamic"), SmoothQuant(alpha=0.7), OutlierChannels()])
    assert Quantize.from_dict(q.to_dict()) == q
    assert json.loads(json.dumps(q.to_dict())) == q.to_dict()
    assert Quantize().weights == Weights() and Quantize().activations == Activations()  # static INT8 by default


def test_each_pass_validates_itself_and_its_fit_with_the_others():
    with pytest.raises(ValueError, match=r"damp must be in \(0.0, 1.0\]"):
        GPTQ(damp=0)
    with pytest.raises(ValueError, match="GPTQ works on group-wise weights"):
        Quantize.of([Weights(bits=4), Activations(mode="none"), GPTQ()])
    with pytest.raises(ValueError, match="one rounding pass"):
        Quantize.of([Weights(bits=4, group_size=32), Activations(mode="none"), GPTQ(), AWQ()])
    with pytest.raises(ValueError, match="appears more than once"):
        Quantize.of([BiasCorrection(), BiasCorrection()])
    with pytest.raises(ValueError, match=r"AdaRound runs before BiasCorrection .*\['AdaRound', 'BiasCorrection'\]"):
        Quantize.of([BiasCorrection(), AdaRound()])
    with pytest.raises(ValueError, match=r"SmoothQuant works with Activations\(mode='dynamic'\)"):
        Quantize.of([Weights(), SmoothQuant()])
    with pytest.raises(ValueError, match="AdaRound learns per-channel grids"):
        Quantize.of([Weights(bits=4, group_size=32), Activations(mode="none"), AdaRound()])
    with pytest.raises(ValueError, match=r"Equalize needs Weights\(fold_bn=True\)"):
        Quantize.of([Weights(fold_bn=False), Equalize()])
    with pytest.raises(ValueError, match="KeepFloat does not combine with group-wise"):
        Quantize.of([Weights(bits=4, group_size=32), Activations(mode="none"), KeepFloat()])
    with pytest.raises(ValueError, match=r"unknown quantization pass 'gptqq' \(did you mean 'gptq'\?\)"):
        Quantize.of(["gptqq"])
    with pytest.raises(ValueError, match=r"pass 1 \(gptq\): unknown key\(s\) for GPTQ: 'dampp' \(did you mean 'damp'\?\)"):
        Quantize.of([Weights(bits=4, group_size=32), {"gptq": {"dampp": 0.1}}])
    with pytest.raises(ValueError, match="unknown key.*for Quantize: 'stages'"):
        Quantize.from_dict({"stages": []})
    with pytest.raises(ValueError, match="a pass is a name or a one-key mapping"):
        Quantize.of([{"gptq": {}, "awq": {}}])


def test_the_passes_are_recorded_and_replayed_by_load(trained_mlp, digits, tmp_path):
    calib = batches(digits.train_x[:128], None, 64)
    q = sk.quantize(trained_mlp, [Weights(bits=4, reduce_range=False, group_size=32, symmetric=False),
                                  Activations(mode="none"), AWQ(clip=False)], calib_data=calib)
    sk.save(q, tmp_path / "q")
    [plan] = json.loads((tmp_path / "q" / "plan.json").read_text())["plans"]
    assert [next(iter(p)) for p in plan["config"]["passes"]] == ["weights", "activations", "awq"]
    assert plan["config"]["passes"][2] == {"awq": {"clip": False}}
    back = sk.load(tmp_path / "q", sk.zoo.digits_model("mlp"))
    assert back.slimkit_plan.config == q.slimkit_plan.config
    torch.testing.assert_close(back(digits.test_x[:8]), q(digits.test_x[:8]))


def test_plans_saved_with_the_old_flat_config_still_load(trained_mlp, digits, tmp_path):
    q = sk.quantize(trained_mlp, "int8", calib_data=batches(digits.train_x[:128], None, 64))
    sk.save(q, tmp_path / "q")
    path = tmp_path / "q" / "plan.json"
    doc = json.loads(path.read_text())
    doc["plans"][0]["config"] = {**sk.QuantConfig(quantize_embeddings=True, bias_correction=True).to_dict()}
    path.write_text(json.dumps(doc))
    back = sk.load(tmp_path / "q", sk.zoo.digits_model("mlp"))
    assert back.slimkit_plan.config == CHANGED["int8"]  # the old form, translated
    torch.testing.assert_close(back(digits.test_x[:8]), q(digits.test_x[:8]))


@dataclass(frozen=True, kw_only=True)
class SnapSmall(QuantPass):
    """A toy layer pass: rounded weights below ``threshold`` times the layer's largest become zero."""

    threshold: float = 0.05

    def validate(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive, got {self.threshold}")


def _snap_small(job, cfg, layer):
    small = layer.wq.abs() < cfg.threshold * layer.wq.abs().max()
    layer.wq = torch.where(small, torch.zeros_like(layer.wq), layer.wq)
    job.summary.setdefault("snapped", []).append(layer.name)


@dataclass(frozen=True, kw_only=True)
class OrderProbe(QuantPass):
    """A toy model pass that records whether SmoothQuant had run before it (``tag`` names it)."""

    tag: str = ""


def _order_probe(job, cfg):
    job.summary.setdefault("order", []).append((cfg.tag, "smoothquant" in job.summary))


@pytest.fixture
def toy_passes():
    """The two toy passes above, registered as a user would with the two decorators, for one test."""
    quant_pass("snap_small", "layer")(SnapSmall)
    pass_handler(SnapSmall)(_snap_small)
    quant_pass("order_probe", "model", needs_data=False)(OrderProbe)
    pass_handler(OrderProbe)(_order_probe)
    yield
    for name in ("snap_small", "order_probe"):
        PASSES.pop(name, None)


def test_a_new_pass_is_one_config_class_and_one_handler(trained_mlp, digits, toy_passes):
    """The two toy passes above: usable by object and by name, validated, run in the order written,
    recorded in the plan."""
    calib = batches(digits.train_x[:128], None, 64)
    plain = sk.quantize(trained_mlp, [Weights(), Activations(mode="dynamic"), BiasCorrection()], calib_data=calib)
    snapped = sk.quantize(trained_mlp, [Weights(), Activations(mode="dynamic"), {"snap_small": {"threshold": 0.05}},
                                        BiasCorrection()], calib_data=calib)
    zeros = [int((m.get_submodule("3").weight_q == 0).sum()) for m in (plain, snapped)]
    assert zeros[1] > zeros[0] + 100, zeros
    assert snapped.slimkit_plan.passes["snapped"] == ["1", "3", "5"]
    assert snapped.slimkit_plan.config.passes[2] == SnapSmall(threshold=0.05)
    with pytest.raises(ValueError, match="threshold must be positive"):
        Quantize.of([{"snap_small": {"threshold": -1}}])
    dynamic = [Weights(), Activations(mode="dynamic")]
    before = sk.quantize(trained_mlp, [*dynamic, OrderProbe(tag="p"), SmoothQuant()], calib_data=calib)
    after = sk.quantize(trained_mlp, [*dynamic, SmoothQuant(), {"order_probe": {"tag": "p"}}], calib_data=calib)
    assert before.slimkit_plan.passes["order"] == [("p", False)] and after.slimkit_plan.passes["order"] == [("p", True)]


def test_the_cli_builds_the_list_from_a_preset_and_pass_flags():
    from slimkit.cli.flags import add_pass_flags, build_passes

    p = argparse.ArgumentParser()
    add_pass_flags(p)
    args = p.parse_args(["--weights-group-size", "32", "--pass", "gptq", "--gptq-act-order", "--no-pass", "embeddings"])
    assert build_passes(args, "int4-weight") == Quantize.of([Weights(bits=4, reduce_range=False, group_size=32),
                                                             Activations(mode="none"), GPTQ(act_order=True)])
    args = p.parse_args(["--smoothquant-alpha", "0.8"])
    assert build_passes(args, "int8-dynamic").find(SmoothQuant) == SmoothQuant(alpha=0.8)
    with pytest.raises(ValueError, match="did you mean 'gptq'"):
        build_passes(p.parse_args(["--pass", "gtpq"]), "int8")
    with pytest.raises(ValueError, match="SmoothQuant works with Activations"):
        build_passes(p.parse_args(["--pass", "smoothquant"]), "int8")


def test_a_recipe_stage_is_a_list_of_passes():
    from slimkit.recipe import load_recipe

    recipe = load_recipe(text="""
model:
  factory: slimkit.zoo:trained
  args: [mlp]
data: slimkit.data:task
evaluate: slimkit.data:digits_accuracy
out: run
stages:
  - quantize: [weights, {activations: {mode: dynamic}}, {smoothquant: {alpha: 0.6}}]
""")
    assert recipe.stages[0].config == Quantize.of([Weights(), Activations(mode="dynamic"), SmoothQuant(alpha=0.6)])
    with pytest.raises(ValueError, match=r"stages\[0\].quantize.*unknown quantization pass 'smoothqaunt'"):
        load_recipe(text="model: {factory: slimkit.zoo:trained, args: [mlp]}\ndata: slimkit.data:task\n"
                    "evaluate: slimkit.data:digits_accuracy\nout: run\nstages:\n  - quantize: [smoothqaunt]\n")


def test_embeddings_is_a_pass_of_its_own():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 8)).eval()
    with_tables = sk.quantize(m, [Weights(), Activations(mode="dynamic"), Embeddings(bits=4)])
    without = sk.quantize(m, [Weights(), Activations(mode="dynamic")])
    assert with_tables.slimkit_plan.quantized_layers == ["1", "0"] and without.slimkit_plan.quantized_layers == ["1"]


def test_asymmetric_adaround_and_bias_correction_from_the_float_model_undo_the_inputs_error():
    """Given the quantized model's inputs (here 5% too large, with an offset) and the float model's,
    AdaRound's asymmetric reconstruction and bias correction from the float model aim at the float
    model's output, which the plain forms cannot see."""
    from slimkit.quant.adaround import adaround
    from slimkit.quant.bias_correction import output_shift, output_shift_from_float

    torch.manual_seed(0)
    w = torch.randn(16, 32)
    xf = [torch.randn(256, 32) for _ in range(2)]
    xq = [1.05 * x + 0.1 for x in xf]
    scale = w.abs().amax(1) / 7

    def out(x, wq):
        return x @ wq.t()

    def error(wq, shift):
        return sum(float((out(q, wq) - shift - out(f, w)).pow(2).mean()) for q, f in zip(xq, xf, strict=True))

    plain = adaround(w, scale, -7, 7, out, xq, iterations=300)
    asym = adaround(w, scale, -7, 7, out, xq, iterations=300, target_inputs=xf)
    zero = torch.zeros(16)
    assert error(asym, zero) < 0.8 * error(plain, zero)
    shift_plain = output_shift(out, w, asym, xq, channel_dim=-1)
    shift_float = output_shift_from_float(out, w, asym, xq, xf, channel_dim=-1)
    assert error(asym, shift_float) < 0.7 * error(asym, shift_plain)
    with pytest.raises(ValueError, match="pair with inputs"):
        adaround(w, scale, -7, 7, out, xq, iterations=1, target_inputs=xf[:1])
    with pytest.raises(ValueError, match="paired"):
        output_shift_from_float(out, w, asym, xq, xf[:1])


def test_the_sweep_gives_passes_that_ask_the_float_models_inputs(trained_resnet, digits):
    calib = batches(digits.train_x[:64], None, 32)
    w4 = Weights(bits=4, reduce_range=False)
    q = sk.quantize(trained_resnet, [w4, Activations(), AdaRound(iterations=20, asymmetric=True),
                                     BiasCorrection(from_float=True)], calib_data=calib)
    assert len(q.slimkit_plan.passes["adarounded"]) == len(q.slimkit_plan.passes["bias_corrected"]) > 10
    x = digits.test_x[:64]
    with torch.no_grad():
        agree = float((q(x).argmax(1) == trained_resnet(x).argmax(1)).float().mean())
    assert agree > 0.9


def test_bias_correction_from_float_is_kept_only_where_it_brings_the_outputs_closer():
    """``BiasCorrection(from_float=True)`` quantizes both ways and keeps the source whose outputs on
    the calibration data are closer to the float model's; on a random-weight MobileNetV2 with two
    images (ReLU6s saturating) the float target overshoots, and the layers' own inputs win."""
    from slimkit.core.batch import output_error
    from slimkit.zoo.archs import ARCHS

    model, batch = ARCHS["zoo-mobilenet-v2"].build()
    data = [batch, batch]
    ref = [[model(batch).detach()]]
    base = [Weights(), Activations()]
    compared = sk.quantize(model, [*base, BiasCorrection(from_float=True)], calib_data=data)
    forced = sk.quantize(model, [*base, BiasCorrection(from_float=True, compare=False)], calib_data=data)
    own = sk.quantize(model, [*base, BiasCorrection()], calib_data=data)
    source = compared.slimkit_plan.passes["bias_correction_source"]
    assert source["from_float"] is False and source["sqnr_db_own_inputs"] > source["sqnr_db_from_float"]
    err = {k: output_error(m, [batch], ref) for k, m in [("compared", compared), ("forced", forced), ("own", own)]}
    assert err["compared"] == pytest.approx(err["own"]) and err["compared"] < err["forced"]
    assert "bias_correction_source" not in forced.slimkit_plan.passes
    with pytest.raises(ValueError, match="compare must be one of"):
        BiasCorrection(from_float=True, compare="yes")
