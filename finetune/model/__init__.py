"""The model: a timm backbone with a new head (backbone.py), weights from the hub, a file or a package
(weights.py), the audited parameter-group plan (plan.py, groups.py), the optimizer and LR schedule
(optim.py), the export in timm's format (export.py) with the environment.json
(environment.py) that describes it, loading an export for prediction (predict.py), and writing it as ONNX
or TorchScript, checked against PyTorch (formats.py).

May import `finetune.recipe`, `finetune.data` (image decoding for prediction), `finetune.tasks` (what a
prediction is and what the export records) and `finetune.errors`; never reporting, rundir or training.
"""
