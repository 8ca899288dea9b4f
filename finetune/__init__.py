"""finetune: fine-tune pretrained timm image backbones from a short YAML recipe.

    import finetune
    result = finetune.train("recipes/quickstart.yaml", **{"train.epochs": 3})
    predictor = finetune.load(result.run_dir)
    predictor.predict("some_image.png")
    report = finetune.evaluate(result.run_dir, "path/to/labelled/folder")
    finetune.runs("runs")  # every run in runs/: backbone, epochs, accuracies, finished / interrupted / running

Names are imported on first use, so `finetune --help` answers without loading torch.
"""

from importlib import import_module

from .errors import FinetuneError

_EXPORTS = {
    "train": "api", "plan": "api", "check_data": "api", "lr_find": "api", "load": "api", "evaluate": "api",
    "export": "api", "resolve": "api", "Predictor": "api", "TrainResult": "api", "EvalResult": "api",
    "ExportResult": "api", "runs": "api", "RunSummary": "api",
    "load_recipe": "recipe.load", "RecipeConfig": "recipe.schema",
}
__all__ = [*_EXPORTS, "FinetuneError"]
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
