"""The compression verbs on the command line: ``quantize``, ``qat``, ``prune``, ``sparse-train``,
``factorize``, ``distill``. Each takes the user's model (``package.module:factory``, ``file.py:factory`` or a Hugging
Face folder) and data (see ``slimkit.data.sources``), builds the same config object the Python verb
takes (a preset, then one flag per config field), and ends with ``sk.save``, ``sk.export_onnx`` (parity
checked in ONNX Runtime) and the compressed model's fidelity to the original on the evaluation data."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from slimkit.cli.flags import add_config_flags, add_pass_flags, build_config, build_passes
from slimkit.data.sources import UserData, batch_len, first_samples, import_object, load_data

__all__ = ["add_verbs"]

log = logging.getLogger("slimkit.cli")


# -- the model ---------------------------------------------------------------------------------------

def _is_hf_folder(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "config.json").is_file()


def _state_dict(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or a pickle that is not weights-only
        raise ValueError(f"--checkpoint {path}: cannot read it as a state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def build_model(spec: str, factory_args: list[str], checkpoint: str | None, hf_class: str = "AutoModel",
                flag: str = "model") -> Any:
    """The model a command line names, in eval mode."""
    from torch import nn

    if _is_hf_folder(spec):
        import transformers

        cls = getattr(transformers, hf_class, None)
        if cls is None:
            raise ValueError(f"--hf-class {hf_class!r} is not a transformers class")
        model = cls.from_pretrained(spec, local_files_only=True)
    else:
        if Path(spec).is_dir():
            raise ValueError(f"{flag} {spec!r} is a folder without config.json; give a Hugging Face model folder "
                             "or package.module:factory")
        factory = import_object(spec, flag)
        model = factory(*factory_args) if callable(factory) else factory
        if not isinstance(model, nn.Module):
            raise ValueError(f"{flag} {spec!r} gave a {type(model).__name__}, not an nn.Module")
    if checkpoint:
        try:
            model.load_state_dict(_state_dict(checkpoint))
        except RuntimeError as e:  # missing or unexpected keys, shapes that differ
            raise ValueError(f"--checkpoint {checkpoint} does not fit {type(model).__name__}: "
                             f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from e
    return model.eval()


def _model(args: argparse.Namespace) -> Any:
    return build_model(args.model, args.factory_arg, args.checkpoint, args.hf_class)


# -- the data ----------------------------------------------------------------------------------------

def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--image-size is H,W or one number, got {text!r}") from None
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise ValueError(f"--image-size is H,W or one number, got {text!r}")
    return (vals[0], vals[-1])


def _data(args: argparse.Namespace, which: str = "data") -> UserData:
    spec = getattr(args, which) or (args.data if which == "eval_data" else None)
    if spec is None:
        if args.model.startswith("slimkit.zoo:"):
            spec = "digits"
        else:
            raise ValueError("give --data: your model's inputs, as a .npy/.npz/.pt/.safetensors file, a folder of "
                             "images, a text file (Hugging Face folders) or package.module:function "
                             "(the bundled digits are only the zoo models' default)")
    folder = args.model if _is_hf_folder(args.model) else None
    split = "test" if which == "eval_data" and spec == "digits" else "train"
    return load_data(spec, args.batch_size, folder, _image_size(args.image_size), args.max_length, split=split)


# -- reporting ---------------------------------------------------------------------------------------

def _outputs(model: Any, data: UserData) -> tuple[Any, bool]:
    """The first output tensor on every batch, one row per sample; and whether it is N x classes."""
    import torch

    from slimkit.core.batch import call, first_tensor

    outs, logits = [], True
    with torch.no_grad():
        for b in data.inputs:
            t = first_tensor(call(model.eval(), b)).float()
            logits = logits and t.ndim == 2 and t.shape[1] > 1
            mask = b.get("attention_mask") if isinstance(b, dict) else None
            if mask is not None and t.ndim == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
                outs.append(t[mask.bool()])  # one row per real token: padding's outputs mean nothing
            else:
                outs.append(t.flatten(1) if t.ndim > 1 else t[:, None])
    return torch.cat(outs), logits


def fidelity(original: Any, compressed: Any, data: UserData, label: str) -> str:
    """Accuracy (with labels, for classifiers) and agreement with the original on ``data``."""
    import torch

    (ref, logits), (got, _) = _outputs(original, data), _outputs(compressed, data)
    parts = []
    classifier = logits and data.labels is not None and \
        all(y.ndim == 1 and not y.is_floating_point() for y in data.labels)
    if classifier:
        assert data.labels is not None
        y = torch.cat(data.labels)
        acc = [100.0 * float((o.argmax(1) == y).float().mean()) for o in (ref, got)]
        parts.append(f"accuracy on {data.source}: original {acc[0]:.2f}%, {label} {acc[1]:.2f}%")
    rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=1, eps=1e-12).mean())
    agree = f"top-1 agreement {100.0 * float((got.argmax(1) == ref.argmax(1)).float().mean()):.1f}, " \
        if logits else ""
    rows = "samples" if len(ref) == sum(batch_len(b) for b in data.inputs) else "tokens"
    parts.append(f"{label} vs the original on {data.source} ({len(ref)} {rows}): {agree}relative L2 {rel:.2e}, "
                 f"mean cosine {cos:.4f}")
    return "\n".join(parts)


def _finish(args: argparse.Namespace, original: Any, compressed: Any, data: UserData, evald: UserData, label: str,
            head: str = "", hold: bool = False) -> int:
    """Fine-tune (``--finetune``), save, export, check in ONNX Runtime and report fidelity."""
    import slimkit as sk

    lines = [head] if head else []
    lines.append(fidelity(original, compressed, evald, label))
    if getattr(args, "finetune", 0):
        import torch.nn.functional as F

        from slimkit.core.batch import first_tensor
        from slimkit.prune.masks import hold_zeros
        from slimkit.train import fit

        train = data.train()
        loss = None if data.labels is not None else (lambda s, t: F.mse_loss(first_tensor(s), first_tensor(t)))
        with hold_zeros(compressed) if hold else contextlib.nullcontext():
            fit(compressed, train, epochs=args.finetune, lr=args.lr, teacher=original, loss=loss)
        compressed.eval()
        lines.append(f"after {args.finetune} epochs of fine-tuning with distillation from the original:")
        lines.append(fidelity(original, compressed, evald, label))
    sk.save(compressed, args.out)
    name = "model.tflite" if args.target == "tflite" else "model.onnx"
    report = sk.export_onnx(compressed, f"{args.out}/{name}", evald.example(8), target=args.target)
    lines.append(f"saved {args.out}; {'LiteRT' if args.target == 'tflite' else 'ONNX'} parity: {report.parity}")
    if report.runtime_parity is not None and args.target != "tflite":
        lines.append(f"parity in {args.target}: {report.runtime_parity}")
    lines += [f"lint ({args.target}): {issue}" for issue in report.lint.issues[:5]]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _params(model: Any) -> int:
    return sum(t.numel() for t in model.parameters())


# -- the verbs ---------------------------------------------------------------------------------------

def _cmd_quantize(args: argparse.Namespace) -> int:
    from slimkit import api

    config = build_passes(args, args.preset)  # validated before any work
    model = _model(args)
    data, evald = _data(args), _data(args, "eval_data")
    calib = first_samples(data, args.samples).inputs
    q = api.quantize(model, config, calib_data=calib)
    plan: Any = q.slimkit_plan
    return _finish(args, model, q, data, evald, "quantized", head=plan.summary() if hasattr(plan, "summary") else "")


def _cmd_qat(args: argparse.Namespace) -> int:
    from slimkit import api
    from slimkit.verbs import VERBS

    config = build_config(args, *VERBS["qat"], args.preset)
    model = _model(args)
    data, evald = _data(args), _data(args, "eval_data")
    q = api.qat(model, config, data.pairs(), calib_data=first_samples(data, args.samples).inputs)
    return _finish(args, model, q, data, evald, "QAT")


def _cmd_prune(args: argparse.Namespace) -> int:
    from slimkit import api
    from slimkit.verbs import VERBS

    config = build_config(args, *VERBS["prune"], args.preset)
    model = _model(args)
    data, evald = _data(args), _data(args, "eval_data")
    scoring = first_samples(data, args.samples)
    p = api.prune(model, config, example_inputs=data.example(2), data=scoring.train())
    plan: Any = p.slimkit_plan
    n0, n1 = _params(model), _params(p)
    head = f"{plan.summary()}\nparameters {n0} -> {n1} ({n1 / n0:.1%})"
    return _finish(args, model, p, data, evald, "pruned", head=head, hold=config.method not in ("structured", "depth"))


def _cmd_factorize(args: argparse.Namespace) -> int:
    from slimkit import api
    from slimkit.verbs import VERBS

    config = build_config(args, *VERBS["factorize"], args.preset)
    model = _model(args)
    data, evald = _data(args), _data(args, "eval_data")
    needs = config.allocation == "global" or config.whiten
    f = api.factorize(model, config, data=first_samples(data, args.samples).inputs if needs else None)
    plan: Any = f.slimkit_plan
    n0, n1 = _params(model), _params(f)
    return _finish(args, model, f, data, evald, "factorized", head=f"{plan.summary()}\nparameters {n0} -> {n1} ({n1 / n0:.1%})")


def _cmd_sparse_train(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from slimkit.core.batch import first_tensor
    from slimkit.prune.dynamic import PRESETS, SparseTrainConfig, sparse_train

    config = build_config(args, SparseTrainConfig, PRESETS, args.preset)
    model = _model(args)
    data, evald = _data(args), _data(args, "eval_data")
    loss = None if data.labels is not None else (lambda s, t: F.mse_loss(first_tensor(s), first_tensor(t)))
    s = sparse_train(model, config, data.train(), teacher=model if args.distill or data.labels is None else None,
                     loss=loss)
    plan: Any = s.slimkit_plan
    head = "sparsity per layer: " + ", ".join(f"{n} {v:.1%}" for n, v in plan.sparsity_.items())
    return _finish(args, model, s, data, evald, "sparse", head=head)


def _cmd_distill(args: argparse.Namespace) -> int:
    from slimkit import api
    from slimkit.verbs import VERBS

    config = build_config(args, *VERBS["distill"], args.preset)
    student = _model(args)
    teacher = build_model(args.teacher, args.teacher_arg, args.teacher_checkpoint, args.hf_class, "--teacher")
    data, evald = _data(args), _data(args, "eval_data")
    s = api.distill(student, teacher, data.pairs(), config)
    head = f"teacher {_params(teacher)} parameters, student {_params(s)} parameters"
    return _finish(args, teacher, s, data, evald, "student", head=head)


# -- the parsers -------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, verb: str, preset_default: str | None) -> None:
    from slimkit.verbs import PRESET_TABLES

    names = ", ".join(sorted(PRESET_TABLES[verb][1]))
    p.add_argument("model", help="package.module:factory, path/to/file.py:factory (the current folder is importable) "
                   "or a Hugging Face model folder")
    p.add_argument("--factory-arg", action="append", default=[], help="a positional argument of the factory (repeatable)")
    p.add_argument("--checkpoint", help="a state dict: .safetensors, or .pt/.pth (read with weights_only=True)")
    p.add_argument("--hf-class", default="AutoModel", help="the transformers class a model folder is loaded with")
    p.add_argument("--preset", default=preset_default,
                   help=f"a named config ({names}; `slimkit presets {verb}` describes them)"
                   + (f"; default {preset_default}" if preset_default else "; default: none, the flags alone"))
    g = p.add_argument_group("data")
    g.add_argument("--data", help="the model's inputs (and labels): a .npy/.npz/.pt/.safetensors file, a folder of images "
                   "(sub-folders are labels), a text file (with a Hugging Face folder), package.module:function, or "
                   "'digits' (the default for the slimkit.zoo models only)")
    g.add_argument("--eval-data", help="data the result is compared with the original on (default: --data; for "
                   "digits, its test split)")
    g.add_argument("--samples", type=int, default=256, help="samples used for calibration and scores (default 256)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--image-size", help="resize a folder's images to H,W (default: their own size)")
    g.add_argument("--max-length", type=int, default=128, help="tokens per text line (text data)")
    p.add_argument("--out", required=True, help="the output folder: an sk.save folder and model.onnx (model.tflite "
                   "for --target tflite)")
    p.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "openvino", "tvm", "tensorrt", "tflite"],
                   help="the runtime the file is written for (export_onnx's target; default onnxruntime; tflite: "
                   "model.tflite for LiteRT, CNNs)")


def _finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetune", type=int, default=0, help="epochs of fine-tuning with distillation from the original")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of the fine-tuning")


def add_verbs(sub: Any) -> None:
    """The verbs' subcommands, each with one flag per field of its config."""
    from slimkit.distill import DistillConfig
    from slimkit.lowrank import FactorizeConfig
    from slimkit.prune import PruneConfig
    from slimkit.prune.dynamic import SparseTrainConfig
    from slimkit.quant import Quantize
    from slimkit.quant.qat import QATConfig

    table: list[tuple[str, str, str, str | None, bool, type, Any]] = [  # name, help, verb, default preset, fine-tune
        ("quantize", "quantize your model (post-training) and export it", "quantize", "int8", False, Quantize,
         _cmd_quantize),
        ("qat", "quantization-aware training of your model on (inputs, labels) data", "qat", "int8", False, QATConfig,
         _cmd_qat),
        ("prune", "prune your model (structured, unstructured, N:M or depth)", "prune", None, True, PruneConfig,
         _cmd_prune),
        ("sparse-train", "dynamic sparse training of your model (RigL, SET): a fixed budget of non-zero weights that "
         "moves while it trains", "sparse_train", None, False, SparseTrainConfig, _cmd_sparse_train),
        ("factorize", "low-rank decomposition of your model", "factorize", None, True, FactorizeConfig, _cmd_factorize),
    ]
    for name, text, verb, default, finetune, cls, fn in table:
        p = sub.add_parser(name, help=text)
        _common(p, verb, default)
        if finetune:
            _finetune(p)
        if name == "sparse-train":
            p.add_argument("--distill", action="store_true", help="the original model teaches (soft targets with the labels)")
        if name == "quantize":
            add_pass_flags(p)
        else:
            add_config_flags(p, cls)
        p.set_defaults(fn=fn)
    p = sub.add_parser("distill", help="train your student from a teacher on (inputs, labels) data")
    _common(p, "distill", None)
    p.add_argument("--teacher", required=True, help="package.module:factory, file.py:factory or a Hugging Face folder")
    p.add_argument("--teacher-arg", action="append", default=[])
    p.add_argument("--teacher-checkpoint", help="the teacher's state dict (.safetensors, .pt)")
    add_config_flags(p, DistillConfig)
    p.set_defaults(fn=_cmd_distill)
