"""Recipes: one YAML file, a list of stages run on one model, validated before any work starts,
resumable after an interruption.

.. code-block:: yaml

    model:
      factory: slimkit.zoo:trained      # package.module:function returning the nn.Module
      args: [resnet18]                   # (or kwargs: {...}); checkpoint: weights.safetensors
      # hf: path/to/folder               # a Hugging Face folder instead (hf_class: AutoModel)
    data: slimkit.data:task              # -> {"train": (inputs, labels) batches, "calib": input batches, "example": a batch}
    # data: train.npz                    # or a data file or folder, as the command line takes (inputs and labels)
    evaluate: slimkit.data:digits_accuracy # model -> float, higher is better (run on the ONNX file)
    out: out/recipe
    stages:
      - prune: {sparsity: 0.5, round_to: 8}
      - distill: {epochs: 3, lr: 0.01}    # the original model teaches
      - quantize: int8                     # a preset name or a list of passes
    # other stages: factorize (FactorizeConfig), qat (a QAT preset or QATConfig), tune (TuneConfig),
    # sparse_train (dynamic sparse training, SparseTrainConfig: RigL or SET)

Relative paths (``checkpoint``, ``hf``, ``out``) are relative to the recipe file. Every stage
writes ``out/NN-kind/``: ``model/`` (an ``sk.save`` folder), ``model.onnx`` and ``metrics.json``
(the evaluation on the ONNX file in ONNX Runtime, size, batch-1 latency, parity), atomically; and
``out/run.json`` records the stages done. Running the recipe again resumes after the last finished
stage; an ``out`` that holds another run (another model, data, or a changed stage) is refused, never
overwritten. At the end ``out/results.json`` and the report (``report.md``, ``report.html``).
"""

from .run import run_recipe
from .spec import STAGE_KINDS, Recipe, RecipeError, Stage, import_path, load_recipe

__all__ = ["Recipe", "RecipeError", "Stage", "load_recipe", "run_recipe", "STAGE_KINDS", "import_path"]
