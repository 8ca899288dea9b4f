"""Augmentation on the training device: loader workers only cut crops out of decoded images (decoded.py) and
draw their random parameters; one batched call on the GPU resizes, flips and colour-jitters them. When the
training device is the CPU, the workers also resize each crop (torch's antialiased uint8 kernel: 0.15 ms an
image on one core, where roi_align takes 5 ms) and the batched call flips, jitters and normalises.

Three pieces, in the order a batch meets them:
- a per-sample step (`TrainCrop`, `EvalCrop`) for loaders.Transformed(..., raw=True): from a uint8 HWC
  image to (patch, params). The patch is the crop box cut out of the image (only those pixels are then
  copied, pinned, padded and sent); params is float32 [8]: the box x0, y0, x1, y1 in the patch's pixel
  coordinates, flip (0/1), brightness, contrast and saturation factors. Random draws come from torch's
  global generator, which loaders.EpochSeeded reseeds per epoch and worker, so runs and resumes repeat.
- `collate_crops`: ((patch, params), label) samples to (uint8 [B, Hmax, Wmax, 3], params [B, 8], labels [B]).
- `DeviceAugment`: (uint8 batch, params) to the normalised float [B, 3, S, S] the model takes.

The training augmentation is timm's default one (random-resized crop, horizontal flip, ColorJitter(j, j, j))
with two differences: the crop is resized by torchvision.ops.roi_align (bilinear, averaging several samples
per output pixel when it shrinks, so antialiased; not PIL's bicubic), and brightness, contrast and saturation
are applied in that fixed order (torchvision's ColorJitter shuffles the order per image). The eval path is
exact: its box is a whole-pixel centre crop resized to its own size, which roi_align samples at the pixel
centres, so the output equals timm's eval transform on the PIL image.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate
from torchvision.ops import roi_align
from torchvision.transforms import RandomResizedCrop

from ..recipe.schema import DataConfig
from .decoded import why_not_cached

RATIO = (3 / 4, 4 / 3)  # timm's default aspect-ratio range of a random-resized crop
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
CPU_CHUNK = 8  # images augmented at a time on a CPU (see DeviceAugment.__call__)


class TrainCrop:
    """Training's per-sample step: a random-resized-crop box (area share in `scale`, aspect in `ratio`), a
    horizontal flip with probability `hflip`, and brightness, contrast and saturation factors each uniform
    in [max(0, 1 - color_jitter), 1 + color_jitter]."""

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = RATIO,
                 hflip: float = 0.5, color_jitter: float = 0.4, size: int | None = None,
                 interpolation: str = "bilinear"):
        self.scale, self.ratio, self.hflip, self.color_jitter = list(scale), list(ratio), hflip, color_jitter
        # size: resize the crop here, in the loader worker, with torch's antialiased uint8 kernel, for a
        # CPU training device (0.15 ms an image where roi_align takes 5 ms); None: DeviceAugment resizes.
        self.size, self.interpolation = size, interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"

    def draw(self, height: int, width: int) -> torch.Tensor:
        """Params for an image of this size, with the box in the image's own pixel coordinates."""
        # get_params reads only the size of what it is given; a stride-0 view allocates nothing.
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(()).expand(3, height, width), self.scale,
                                                       self.ratio)
        flip = float(torch.rand(()) < self.hflip) if self.hflip > 0 else 0.0
        j = self.color_jitter
        factors = torch.empty(3).uniform_(max(0.0, 1 - j), 1 + j).tolist() if j > 0 else [1.0, 1.0, 1.0]
        return torch.tensor([left, top, left + w, top + h, flip, *factors], dtype=torch.float32)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size is None:
            return _cut(image, self.draw(image.shape[0], image.shape[1]))
        params = self.draw(image.shape[0], image.shape[1])
        x0, y0, x1, y1 = (int(v) for v in params[:4])
        resized = torch.nn.functional.interpolate(image[y0:y1, x0:x1].permute(2, 0, 1)[None],
                                                  size=(self.size, self.size), mode=self.interpolation,
                                                  antialias=True)[0]
        resized = resized.permute(1, 2, 0)  # HWC again; contiguous, as the kernel keeps the input's NHWC layout
        if params[4] > 0.5:  # flipped here too: a uint8 flip costs the worker little, a float one the device more
            resized = resized.flip(1)
        params[:5] = torch.tensor([0, 0, self.size, self.size, 0])
        return resized.contiguous(), params


class EvalCrop:
    """Evaluation's per-sample step: the eval transform's centre crop of `size` (torchvision's rounding),
    no flip, colour factors 1."""

    def __init__(self, size: int):
        self.size = size

    def draw(self, height: int, width: int) -> torch.Tensor:
        if height < self.size or width < self.size:
            raise ValueError(f"a {height}x{width} image is smaller than the {self.size} px eval crop")
        top, left = round((height - self.size) / 2.0), round((width - self.size) / 2.0)  # as CenterCrop
        return torch.tensor([left, top, left + self.size, top + self.size, 0, 1, 1, 1], dtype=torch.float32)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _cut(image, self.draw(image.shape[0], image.shape[1]))


def _cut(image: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The box's pixels as their own image, and the params with the box moved onto it."""
    x0, y0, x1, y1 = (int(v) for v in params[:4])
    moved = params.clone()
    moved[:4] = torch.tensor([0, 0, x1 - x0, y1 - y0])
    return image[y0:y1, x0:x1].contiguous(), moved


def collate_crops(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples ((uint8 HWC patch, params [8]), label) of different sizes as (uint8 [B, Hmax, Wmax, 3], params
    [B, 8], labels [B]): each patch at the top left of zeros. roi_align's bilinear sampling reads up to one
    pixel past a box's last pixel centre, where an image on its own is clamped to its edge; one copied row
    and column beyond each patch keep a padded patch's crop identical to the crop of it alone."""
    height, width = max(s[0][0].shape[0] for s in batch), max(s[0][0].shape[1] for s in batch)
    if all(s[0][0].shape[:2] == (height, width) for s in batch):  # crops resized to size in the workers
        images = default_collate([s[0][0] for s in batch])  # in a worker: straight into shared memory
        return images, torch.stack([s[0][1] for s in batch]), _labels(batch)
    images = torch.zeros((len(batch), height, width, 3), dtype=torch.uint8)
    for k, ((patch, _), _) in enumerate(batch):
        h, w = patch.shape[:2]
        images[k, :h, :w] = patch
        if w < width:
            images[k, :h, w] = patch[:, -1]
        if h < height:
            images[k, h, :w + 1] = images[k, h - 1, :w + 1]
    params = torch.stack([s[0][1] for s in batch])
    return images, params, _labels(batch)


def _labels(batch: list) -> torch.Tensor:
    """Class indices [B], or the task's target tensors stacked (multi-hot [B, C] rows, numbers [B])."""
    if isinstance(batch[0][1], torch.Tensor):
        return torch.stack([s[1] for s in batch])
    return torch.tensor([int(s[1]) for s in batch], dtype=torch.long)


class DeviceAugment:
    """(uint8 [B, H, W, 3] batch, params [B, 8]) -> float [B, 3, size, size], normalised with `mean` and `std`
    (the backbone's, for images in [0, 1]), on whatever device the inputs are."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool = False,
                 flips: bool = True):
        # flips False: no image is flipped here (eval, or TrainCrop flipped it in the loader worker).
        self.size, self.channels_last, self.flips = size, channels_last, flips
        self.buffers: dict = {}
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.gray = torch.tensor(GRAY, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        device, n, side = images.device, len(images), self.size
        params = params.to(device, torch.float32)
        out = torch.empty((n, side, side, 3), device=device)  # the caller's to keep
        # On a CPU, a few images at a time: each pass below then runs over memory still in the cache (a
        # 64-image batch at 224 px is 38 MB of floats; 8 images at a time are 1.7x faster than all at once).
        step = CPU_CHUNK if device.type == "cpu" else n
        for i in range(0, n, step):
            self._augment(images[i:i + step], params[i:i + step], out[i:i + step])
        out = out.permute(0, 3, 1, 2)  # NCHW, stored channels_last
        return out if self.channels_last else out.contiguous()

    def _augment(self, images: torch.Tensor, params: torch.Tensor, out: torch.Tensor) -> None:
        """Augment `images` (uint8 NHWC) into `out` (float NHWC of the output size)."""
        device, n, side = images.device, len(images), self.size
        if images.shape[1:3] != (side, side):  # else the workers cut (and resized) every box to size
            rois = torch.cat([torch.arange(n, device=device, dtype=torch.float32)[:, None], params[:, :4]], 1)
            # sampling_ratio -1: as many samples per output pixel as the box is larger than it, averaged.
            x = roi_align(images.permute(0, 3, 1, 2).float(), rois, output_size=side, spatial_scale=1.0,
                          sampling_ratio=-1, aligned=True).permute(0, 2, 3, 1)
        else:  # a float copy of the loader's batch: everything below may work in place
            x = self._buffer("work", (max(n, CPU_CHUNK), side, side, 3), device)[:n].copy_(images)
        if self.flips:
            x = torch.where(params[:, 4].view(-1, 1, 1, 1) > 0.5, x.flip(2), x)
        # Pixels x channels, so that the per-channel work below runs along contiguous memory (NHWC).
        x = x.reshape(n, side * side, 3)
        brightness, contrast, saturation = (params[:, k].view(-1, 1, 1) for k in (5, 6, 7))
        gray, mean, std = self.gray.to(device), self.mean.to(device), self.std.to(device)
        # torchvision.transforms.v2.functional's adjust_brightness, _contrast and _saturation on 0..255, each
        # clamped. Saturation blends each pixel with its own gray: per image a 3x3 matrix on the channels.
        x.mul_(brightness).clamp_(0, 255)
        mean_gray = (x @ gray).mean(1).view(-1, 1, 1)
        x.mul_(contrast).add_(mean_gray * (1 - contrast)).clamp_(0, 255)
        blend = saturation * torch.eye(3, device=device) + (1 - saturation) * gray.view(1, 1, 3)
        x = torch.bmm(x, blend.transpose(1, 2), out=out.view(n, side * side, 3)).clamp_(0, 255)
        x.mul_(1 / (255 * std)).sub_(mean / std)  # ToTensor's /255, then Normalize

    def _buffer(self, name: str, shape: tuple, device: torch.device) -> torch.Tensor:
        """A float work tensor kept for reuse within calls: a fresh allocation of a batch's size costs a CPU
        about as much as a pass of work on it (the memory goes back to the OS and page-faults in again)."""
        kept = self.buffers.get(name)
        if kept is None or kept.shape != shape or kept.device != device:
            kept = self.buffers[name] = torch.empty(shape, device=device)
        return kept


def why_not_on_device(data_cfg: dict, cfg: DataConfig) -> str | None:
    """None when the decoded cache and DeviceAugment can stand in for timm's transforms here; else why not,
    for the set-up printout of a run that keeps decoding and augmenting with PIL in loader workers."""
    if cfg.augment and cfg.auto_augment:
        return f"data.auto_augment {cfg.auto_augment!r} runs on PIL images"
    return why_not_cached(data_cfg)


def build_device_steps(data_cfg: dict, cfg: DataConfig, train_side: int | None = None, resize_in_workers: bool = False
                       ) -> tuple[TrainCrop | EvalCrop, EvalCrop, DeviceAugment, DeviceAugment]:
    """The counterpart of transforms.build_transforms: (train step, eval step, train augment at `train_side`
    px, eval augment at the data config's size). With data.augment false, training gets the eval crop.
    `resize_in_workers` (a CPU training device): training crops are resized in the loader workers."""
    size = data_cfg["input_size"][-1]
    evaluation = EvalCrop(size)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    if not cfg.augment:
        return evaluation, evaluation, DeviceAugment(size, mean, std, flips=False), DeviceAugment(size, mean, std,
                                                                                                  flips=False)
    side = train_side or size
    train = TrainCrop(cfg.scale, RATIO, cfg.hflip, cfg.color_jitter, side if resize_in_workers else None,
                      data_cfg.get("interpolation", "bilinear"))
    return (train, evaluation, DeviceAugment(side, mean, std, flips=not resize_in_workers),
            DeviceAugment(size, mean, std, flips=False))
