"""Using a finished run: `finetune.load(RUN_DIR)` and `finetune predict`.

The model is rebuilt by timm from the exported `config.json` + `model.safetensors` (exactly what any
timm user would do), and images get the eval transform recorded there. A damaged export (a copy cut
short) is a FinetuneError, not a traceback from deep inside safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import timm
import timm.data
import torch
from PIL import Image
from safetensors import SafetensorError

from ..data.images import ImageTooLarge, open_image, to_rgb
from ..errors import FinetuneError
from .export import CONFIG_NAME, WEIGHTS_NAME

ImageLike = Union[str, Path, Image.Image, torch.Tensor]


@dataclass
class Predictor:
    model: torch.nn.Module  # the plain timm model, in eval mode
    label_names: list[str]
    transform: object  # timm eval transform: PIL image -> normalised CHW tensor
    device: torch.device

    def logits(self, images: Iterable[ImageLike] | ImageLike) -> torch.Tensor:
        """Logits for one image or many: paths, PIL images, or tensors (CHW images, or an NCHW batch
        already preprocessed with this model's transform)."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            batch = images
        else:
            if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
                images = [images]
            batch = torch.stack([self._prepare(image) for image in images])
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def predict(self, images: Iterable[ImageLike] | ImageLike, top_k: int = 5) -> list[list[dict]]:
        """Per image, the top_k classes best first: [{"label": ..., "prob": ...}, ...]."""
        probs = self.logits(images).softmax(dim=-1)
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[{"label": self.label_names[i], "prob": float(p)} for p, i in zip(row_p.tolist(), row_i.tolist())]
                for row_p, row_i in zip(values, indices)]

    def _prepare(self, image: ImageLike) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            try:
                image = open_image(image)
            except ImageTooLarge as e:
                raise FinetuneError(f"cannot read image {image}: {e}. PIL refuses more than twice "
                                    "PIL.Image.MAX_IMAGE_PIXELS pixels as a possible decompression bomb; shrink the "
                                    "image first, or, if you trust the file, raise that limit in Python before "
                                    "predicting (PIL.Image.MAX_IMAGE_PIXELS = None lifts it).") from None
            except (OSError, ValueError) as e:
                raise FinetuneError(f"cannot read image {image}: {e}") from None
        elif isinstance(image, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(image)
        return self.transform(to_rgb(image))


def load(run_dir: str | Path, device: str | torch.device | None = None) -> Predictor:
    """Load an exported run (its best epoch) for prediction."""
    run_dir = Path(run_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (run_dir / name).is_file():
            raise FinetuneError(f"{run_dir} has no {name}; give a run directory written by `finetune train` "
                                "(the export appears after the first epoch).")
    try:
        model = timm.create_model(f"local-dir:{run_dir.resolve()}", pretrained=True)
        labels = json.loads((run_dir / CONFIG_NAME).read_text()).get("label_names") or [
            str(i) for i in range(model.num_classes)]
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise FinetuneError(f"the exported model cannot be read from {run_dir} ({type(e).__name__}: {str(e)[:200]}): "
                            f"{WEIGHTS_NAME} or {CONFIG_NAME} is damaged or incomplete (a copy cut short, a full "
                            "disk). Copy the run directory again from where it was trained, or train again.") from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    return Predictor(model, list(labels), transform, device)
