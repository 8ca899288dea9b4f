"""Using a finished run: `finetune.load(RUN_DIR)` and `finetune predict`.

The model is rebuilt by timm from the exported `config.json` + `model.safetensors` (exactly what any
timm user would do), and images get the eval transform recorded there; the task recorded there
(tasks/build.py) says what a prediction is: the top-k classes, the labels over a threshold, a number. A
damaged export (a copy cut short) is a FinetuneError, not a traceback from deep inside safetensors.
`finetune predict` takes image files, folders (every image inside, recursively) and manifests
(`list_images`), and writes a CSV of the predictions (`save_predictions`); `tta` averages the logits of
each image and its mirror image. An image that cannot be read, or is too large to decode or too elongated
to resize (data/images.py), is a FinetuneError naming it: one such file among many stops the command, as
any unreadable one does.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

import timm
import timm.data
import torch
from PIL import Image
from safetensors import SafetensorError

from ..atomic import write_atomic
from ..data.images import IMAGE_EXTENSIONS, MAX_ASPECT_RATIO, ImageTooElongated, ImageTooLarge
from ..data.manifests import IMAGE_COLUMNS, read_manifest_rows
from ..data.samples import as_pil, natural_key
from ..errors import FinetuneError
from ..tasks import SingleLabel, Task, load_task
from .custom import refuse_custom_export
from .export import CONFIG_NAME, WEIGHTS_NAME

ImageLike = Union[str, Path, Image.Image, torch.Tensor]


@dataclass
class Predictor:
    model: torch.nn.Module  # the plain timm model, in eval mode
    label_names: list[str]
    transform: object  # timm eval transform: PIL image -> normalised CHW tensor
    device: torch.device
    # What a prediction is, from config.json: the top-k classes, the labels over the run's threshold, a number.
    task: Task = field(default_factory=SingleLabel)

    def logits(self, images: Iterable[ImageLike] | ImageLike, tta: bool = False, batch_size: int = 64) -> torch.Tensor:
        """Logits for one image or many: paths, PIL images, or tensors (CHW images, or an NCHW batch
        already preprocessed with this model's transform), `batch_size` images per forward pass. `tta`:
        the mean of the logits of each image and its horizontal mirror."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            batches = [images]
        else:
            if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
                images = [images]
            images = list(images)
            batches = (torch.stack([self._prepare(image) for image in images[i:i + batch_size]])
                       for i in range(0, len(images), batch_size))
        with torch.inference_mode():
            return torch.cat([self._forward(batch.to(self.device), tta) for batch in batches])

    def predict(self, images: Iterable[ImageLike] | ImageLike, top_k: int = 5, tta: bool = False,
                threshold: float | None = None) -> list:
        """Per image, what the run's task predicts (Task.predictions, tasks/): the top_k classes best first,
        [{"label": ..., "prob": ...}, ...]; with label sets every label whose probability reaches `threshold`
        (default: the export's), most probable first, [] where none does; with numbers the number, in the
        units the run trained on."""
        return self.task.predictions(self.logits(images, tta), self.label_names, top_k, threshold)

    def _forward(self, batch: torch.Tensor, tta: bool) -> torch.Tensor:
        logits = self.model(batch).float()
        if tta:  # a mirror image shows the same classes (training augments with flips too): average the two views
            logits = (logits + self.model(batch.flip(-1)).float()) / 2
        return logits.cpu()

    def _prepare(self, image: ImageLike) -> torch.Tensor:
        where = f"image {image}" if isinstance(image, (str, Path)) else "an image"
        try:
            image = as_pil(image)  # opens a file; refuses an elongated image before the transform resizes it
        except ImageTooElongated as e:
            raise FinetuneError(f"cannot predict {where}: {e}. The model's transform scales the short side up to "
                                "its input size, so the longer the image, the more memory it takes (1x20000 pixels: "
                                f"gigabytes); crop it into pieces of at most {MAX_ASPECT_RATIO}:1 and predict "
                                "those.") from None
        except ImageTooLarge as e:
            raise FinetuneError(f"cannot read {where}: {e}. PIL refuses more than twice "
                                "PIL.Image.MAX_IMAGE_PIXELS pixels as a possible decompression bomb; shrink the "
                                "image first, or, if you trust the file, raise that limit in Python before "
                                "predicting (PIL.Image.MAX_IMAGE_PIXELS = None lifts it).") from None
        except (OSError, ValueError) as e:
            if not isinstance(image, (str, Path)):
                raise
            raise FinetuneError(f"cannot read {where}: {e}") from None
        return self.transform(image)


def load(run_dir: str | Path, device: str | torch.device | None = None, task: Task | None = None) -> Predictor:
    """Load an exported run (its best epoch) for prediction. `task`: the task of one's own it trained with
    (finetune.train(task=...)); the built-in ones are read from its config.json."""
    run_dir = Path(run_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (run_dir / name).is_file():
            raise FinetuneError(f"{run_dir} has no {name}; give a run directory written by `finetune train` "
                                "(the export appears after the first epoch).")
    try:
        refuse_custom_export(json.loads((run_dir / CONFIG_NAME).read_text()), run_dir)  # not timm's to rebuild
        model = timm.create_model(f"local-dir:{run_dir.resolve()}", pretrained=True)
        config = json.loads((run_dir / CONFIG_NAME).read_text())
        labels = config.get("label_names") or [str(i) for i in range(model.num_classes)]
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise FinetuneError(f"the exported model cannot be read from {run_dir} ({type(e).__name__}: {str(e)[:200]}): "
                            f"{WEIGHTS_NAME} or {CONFIG_NAME} is damaged or incomplete (a copy cut short, a full "
                            "disk). Copy the run directory again from where it was trained, or train again.") from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    return Predictor(model, list(labels), transform, device, load_task(config, str(run_dir), task))


def list_images(items: Iterable[str | Path]) -> list[str]:
    """What `finetune predict` was given, as image paths: a file as it is, a folder as every image inside it
    (subfolders too, hidden ones left out, in natural order), a .csv/.jsonl manifest as the images it lists
    (its image column, paths relative to the manifest)."""
    paths: list[str] = []
    for given in items:
        item = Path(given)
        if item.is_dir():
            found = _folder_images(item)
            if not found:
                raise FinetuneError(f"{item} holds no images ({', '.join(IMAGE_EXTENSIONS)}), in subfolders neither.")
            paths += found
        elif item.suffix.lower() in (".csv", ".jsonl") and item.is_file():
            paths += _manifest_images(item)
        elif not item.exists():
            raise FinetuneError(f"{item}: no such file or folder; give image files, folders of images or a "
                                ".csv/.jsonl manifest.")
        else:
            paths.append(str(given))  # as given: the output names it the way the user did
    return paths


def _folder_images(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden folders (.git, caches) hold no data
        found += [os.path.join(root, name) for name in files
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return sorted(found, key=natural_key)


def _manifest_images(path: Path) -> list[str]:
    rows, _ = read_manifest_rows(path)
    columns = {c.lower(): c for c in (rows[0] if rows else {})}
    column = next((columns[c] for c in IMAGE_COLUMNS if c in columns), None)
    if column is None:
        raise FinetuneError(f"{path}: no image column ({', '.join(IMAGE_COLUMNS)}) among {list(columns.values())}; "
                            "give one row per image with its path in one of these columns.")
    return [str(path.parent / str(row[column]).strip()) for row in rows if row.get(column)]


def save_predictions(path: str | Path, images: list[str], predictions: list, task: Task = SingleLabel()) -> None:
    """A CSV with one row per image: its path, then the task's columns (Task.prediction_table): prediction,
    probability and the next classes as prediction_2, probability_2, ... (as many as top-k); with label sets
    the labels and probabilities joined by `|` as a manifest writes them; with numbers the number."""
    header, rows = task.prediction_table(predictions)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path"] + header)
    for image, row in zip(images, rows):
        writer.writerow([image] + row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.getvalue())
