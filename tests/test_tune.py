import json

import pytest
import torch

import slimkit as sk
from slimkit.data import digits_accuracy, task
from slimkit.tune import TuneConfig, pareto_front, tune
from slimkit.zoo import digits_model

FAST = {"latency_runs": 20, "latency_seconds": 0.05, "finetune_epochs": 1, "calibrators": ["minmax", "percentile"]}


@pytest.fixture(scope="module")
def digits_task():
    return task()


@pytest.fixture(scope="module")
def tuned(trained_mlp, digits_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    t = digits_task
    cfg = {**FAST, "max_drop": 1.5, "sparsities": [0.5, 0.8], "factorize_method": "svd", "factorize_ratios": [0.5]}
    return tune(trained_mlp, cfg, digits_accuracy, t["example"], t["calib"], out, train_data=t["train"][:20])


def test_tuner_keeps_the_best_within_budget_and_the_pareto_front_on_disk(tuned, trained_mlp):
    r = tuned
    labels = [t.label for t in r.trials]
    assert labels[:3] == ["FP32", "int8 minmax", "int8 percentile"]
    assert any(lbl.startswith("pruned") for lbl in labels) and any("svd" in lbl for lbl in labels)
    floor = r.reference.metric - 1.5
    feasible = [t for t in r.trials if t.metric >= floor and t.parity_ok]
    assert r.best.metric >= floor
    # the pick comes from the confirming round: FP32 and the fastest feasible trials timed again,
    # interleaved; those were the fastest by their first timing, and the pick is the fastest of them now
    confirmed = [t for t in feasible if "latency_single_ms" in t.extra]
    assert r.reference in confirmed and r.best in confirmed
    assert r.best.latency_ms == min(t.latency_ms for t in confirmed)
    others = [t.latency_ms for t in feasible if t not in confirmed]
    if others:
        assert max(t.extra["latency_single_ms"] for t in confirmed if t is not r.reference) <= min(others)
    # the front: nothing on it is beaten on both axes by any trial
    for p in r.pareto:
        assert not any(t.latency_ms < p.latency_ms and t.metric > p.metric for t in r.trials)
    assert [p.label for p in r.pareto] == [p.label for p in pareto_front(r.trials, "latency")]
    # on disk: one line per trial and peer, the front, and the best as a save folder + ONNX file
    rows = [json.loads(line) for line in (r.out / "trials.jsonl").read_text().splitlines()]
    # distill "auto": the first pruned model was fine-tuned both ways and the better way kept
    knob = [row for row in rows if "labels_only" in row]
    assert len(knob) == 1 and knob[0]["distill"] == (knob[0]["distilled"] >= knob[0]["labels_only"])
    assert sum("(distilled)" in lbl or "(labels only)" in lbl for lbl in labels) == 2
    confirmed = [row for row in rows if "confirmed" in row]
    assert len(confirmed) == 1 and confirmed[0]["best"] == r.best.label and "FP32" in confirmed[0]["confirmed"]
    rows = [row for row in rows if "label" in row and "failed" not in row]
    assert len(rows) == len(r.trials) + len(r.peers) and r.peers[0].label == "ORT quantize_static"
    assert json.loads((r.out / "pareto.json").read_text())["front"][0]["label"] == r.pareto[0].label
    best = sk.load(r.out / "best" / "model", digits_model("mlp"))
    assert abs(digits_accuracy(best) - r.best.metric) < 0.6
    assert json.loads((r.out / "best" / "metrics.json").read_text())["label"] == r.best.label
    assert json.loads((r.out / "tuner.json").read_text())["best"]["label"] == r.best.label
    # the caller's model is untouched
    assert trained_mlp[1].weight.shape == (256, 1024)


def test_tuner_refuses_an_earlier_run_folder(tuned, trained_mlp, digits_task):
    t = digits_task
    with pytest.raises(FileExistsError, match="earlier tuner run"):
        tune(trained_mlp, FAST, digits_accuracy, t["example"], t["calib"], tuned.out)


def test_time_budget_still_ends_with_a_saved_model(trained_mlp, digits_task, tmp_path):
    t = digits_task
    r = tune(trained_mlp, {**FAST, "time_budget": 1e-3, "peers": False}, digits_accuracy, t["example"], t["calib"], tmp_path)
    assert [x.label for x in r.trials] == ["FP32"] and r.best.label == "FP32"
    assert "time budget" in r.stopped
    assert (tmp_path / "best" / "model.onnx").exists()


def test_zero_budget_keeps_fp32_when_every_compression_changes_the_outputs(trained_mlp, digits_task, tmp_path):
    t = digits_task
    x = t["example"]
    with torch.no_grad():
        ref = trained_mlp(x)

    def fidelity(model):  # minus the relative error against FP32: only an exact copy scores 0
        with torch.no_grad():
            return -float((model(x) - ref).norm() / ref.norm())

    r = tune(trained_mlp, {**FAST, "max_drop": 1e-4, "sparsities": [0.5], "factorize_ratios": [], "peers": False,
                           "fallback_sqnr_db": [20.0]}, fidelity, x, t["calib"], tmp_path)
    assert r.best.label == "FP32"
    assert any("float fallback" in tr.label for tr in r.trials)  # it tried keeping layers in float


@pytest.mark.parametrize("bad, needle", [
    ({"objective": "speed"}, "objective must be one of"),
    ({"max_drop": -1}, "max_drop"),
    ({"sparsities": [1.0]}, "sparsities"),
    ({"calibrators": ["nope"]}, "calibrators"),
    ({"time_budget": 0}, "time_budget"),
    ({"max_dorp": 1}, "did you mean 'max_drop'"),
    ({"distill": "sometimes"}, "distill must be one of"),
])
def test_bad_tuner_configs(bad, needle):
    with pytest.raises(ValueError, match=needle):
        TuneConfig.from_dict(bad)


def test_an_evaluation_that_raises_stops_the_tuner(trained_mlp, digits_task, tmp_path):
    t = digits_task

    def broken(model):
        raise KeyError("labels")

    with pytest.raises(RuntimeError, match="evaluation function raised.*KeyError"):
        tune(trained_mlp, FAST, broken, t["example"], t["calib"], tmp_path)


def test_a_nan_metric_or_an_unexportable_model_stops_the_tuner_by_name(trained_mlp, digits_task, tmp_path):
    t = digits_task
    with pytest.raises(RuntimeError, match="evaluation function returned nan"):
        tune(trained_mlp, FAST, lambda m: float("nan"), t["example"], t["calib"], tmp_path / "a")
    with pytest.raises(ValueError, match="FP32 model could not be exported or measured"):
        tune(trained_mlp, FAST, digits_accuracy, torch.randn(2, 3), t["calib"], tmp_path / "b")  # wrong input shape
