"""Exports of a run's model to other runtimes: ONNX (run by onnxruntime) and TorchScript (run by torch.jit
without the model's Python code), each checked before it is handed over.

The check runs the written file on a few seeded random images at the model's input size and compares
its logits with the PyTorch model's: the largest absolute difference is reported, and one above the
tolerance is an error, so a file that computes something else never leaves this module under its name
(it is written to a temporary name and renamed only once it passed). With `dynamic_batch` the check also
runs a batch of another size than the one exported with.

What `predict` adds to the model from config.json and a runtime could not know (the standardisation of a
task of numbers) is baked into the graph (Task.output_module, tasks/) and recorded in its metadata too. ONNX needs packages that the toolkit does not install by default (the `export` extra): onnx, onnxruntime,
and onnxscript, which torch's ONNX exporter (torch.export based, the default since torch 2.9) imports.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm.data
import torch

from ..errors import FinetuneError
from .export import CONFIG_NAME, WEIGHTS_NAME
from .predict import load

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"  # the names Hugging Face's ONNX image classifiers use
TOLERANCE = 1e-4  # max abs logit difference; float32 kernels of another runtime differ by about 1e-6
CHECK_IMAGES = 4


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float  # largest |logit - PyTorch logit| over the check images
    images: int  # how many images the check ran
    dynamic_batch: bool

    def summary(self) -> str:
        batch = "any batch size" if self.dynamic_batch else "batch size 1"
        return (f"{self.format} export written to {self.path} ({batch}); checked on {self.images} images: "
                f"max abs logit difference to PyTorch {self.max_abs_diff:.2e}")


def require_onnx_packages() -> None:
    """Raise a FinetuneError naming the extra to install when an ONNX package is missing."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise FinetuneError(f"ONNX export needs the packages onnx, onnxruntime and onnxscript; not installed: "
                            f"{', '.join(missing)}. Install finetune's export extra: pip install 'finetune[export]' "
                            "(from a checkout: pip install -e '.[export]'), or export with --format torchscript, "
                            "which needs nothing more.")


def export_model(model: torch.nn.Module, fmt: Format, output: Path, input_size: tuple[int, int, int],
                 dynamic_batch: bool = False, metadata: dict[str, str] | None = None,
                 tolerance: float = TOLERANCE) -> ExportResult:
    """Write `model` (a timm classifier) to `output` as `fmt`, then check the file's logits against the
    model's on CHECK_IMAGES images of `input_size` (C, H, W). `metadata` (strings) is stored in the file:
    ONNX metadata_props, or extra files of the TorchScript archive."""
    if fmt not in FORMATS:
        raise FinetuneError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if fmt == "onnx":
        require_onnx_packages()
    # On the CPU, in float32 and the standard memory layout: the file must not depend on how the run trained.
    model = model.eval().float().to("cpu", memory_format=torch.contiguous_format)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(CHECK_IMAGES, *input_size, generator=generator)
    # A dynamic batch is exported from a batch of 2: torch.export specialises a dimension of size 1.
    example = images[:2] if dynamic_batch else images[:1]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        write, run = (_write_onnx, _run_onnx) if fmt == "onnx" else (_write_torchscript, _run_torchscript)
        with torch.no_grad():
            write(model, example, scratch, dynamic_batch, metadata or {})
            runner = run(scratch)
            # Fixed batch: the images one by one. Dynamic: a batch of 3 and a batch of 1, neither the
            # exported size.
            batches = [images[:3], images[3:]] if dynamic_batch else [images[i:i + 1] for i in range(len(images))]
            diff = max(float((runner(batch) - model(batch)).abs().max()) for batch in batches)
        if not diff <= tolerance:  # also catches NaN
            raise FinetuneError(f"the {fmt} export does not compute what the PyTorch model does: the largest "
                                f"logit difference on {len(images)} random images is {diff:.3g}, above the "
                                f"tolerance {tolerance:g}. Nothing was written to {output}. This backbone may use "
                                "an operation the exporter translates differently; try the other format.")
        os.replace(scratch, output)
    finally:
        scratch.unlink(missing_ok=True)
    return ExportResult(output, fmt, diff, len(images), dynamic_batch)


def _write_onnx(model, example, path: Path, dynamic_batch: bool, metadata: dict[str, str]) -> None:
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    # An architecture the exporter cannot translate raises here with its own traceback: a limitation of
    # torch.onnx (or a bug), not a mistake the user can fix in the input.
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=dynamic, external_data=False, verbose=False)
    program.model.metadata_props.update(metadata)
    program.save(str(path), external_data=False)


def _run_onnx(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0])


def _write_torchscript(model, example, path: Path, dynamic_batch: bool, metadata: dict[str, str]) -> None:
    # Tracing works for every timm model (scripting needs timm's scriptable layer config). Its warnings
    # are silenced: TorchScript's deprecation (torch recommends torch.export, which ONNX export uses), and
    # "the trace might not generalise", which the check of the written file decides for the sizes it supports.
    with _quiet_torchscript():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=dict(metadata))


def _run_torchscript(path: Path):
    with _quiet_torchscript():
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda batch: loaded(batch)


@contextlib.contextmanager
def _quiet_torchscript():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def export_metadata(config: dict, task_config: dict | None = None) -> dict[str, str]:
    """What a runtime needs besides the graph, from the export's timm config.json: the class names, the
    preprocessing (input size, mean, std, interpolation, crop) and what the task recorded (task: a threshold,
    the standardisation of numbers, already applied by the graph), as JSON strings."""
    cfg = config.get("pretrained_cfg", {})
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {"label_names": json.dumps(config.get("label_names") or []),
            "preprocessing": json.dumps({k: cfg[k] for k in keys if k in cfg}),
            "architecture": str(config.get("architecture", "")),
            **({"task": json.dumps(task_config)} if task_config else {})}


def export_run(run_dir: str | Path, fmt: Format, output: str | Path | None = None,
               dynamic_batch: bool = False) -> ExportResult:
    """Export a run's model (its best epoch, as `finetune train` exported it) as `fmt`, checked. The file
    goes to `output` (a file, or a folder for model.onnx / model.torchscript.pt), default the run directory."""
    if fmt not in FORMATS:
        raise FinetuneError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    run_dir = Path(run_dir).expanduser()
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (run_dir / name).is_file()]
    if missing:
        raise FinetuneError(f"{run_dir} is not a run directory with an exported model (no {' or '.join(missing)} "
                            "there); give the folder that `finetune train` wrote (its model appears after the first "
                            "epoch).")
    target = Path(output).expanduser() if output is not None else run_dir
    target = target / FILE_NAMES[fmt] if target.is_dir() else target
    if target.resolve() in {(run_dir / name).resolve() for name in (CONFIG_NAME, WEIGHTS_NAME)}:
        raise FinetuneError(f"--output {target} would replace the run's own {target.name}; give another file name.")
    if fmt == "onnx":
        require_onnx_packages()  # before the model is loaded: say what to install at once
    predictor = load(run_dir, device="cpu")
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    input_size = tuple(timm.data.resolve_model_data_config(predictor.model)["input_size"])
    return export_model(predictor.task.output_module(predictor.model), fmt, target, input_size, dynamic_batch,
                        export_metadata(config, predictor.task.export_config()))
