"""The recipe schema: typed, frozen sections with every default on one screen, each with its unit and reason.

A recipe names a timm backbone and a data source; everything else has a default chosen to fine-tune well.
Loading, overrides and checks are load.py's job; this module only declares what a recipe may say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

# Defaults are a quality bar: a recipe naming only backbone, weights and data should train well.

# Bounds of the numeric keys, checked with the recipe (load.py). Each lies well beyond any sensible fine-tune,
# so that only a typo (an extra digit, `inf`) trips it: before anything is written, instead of an overflow,
# an out-of-memory kill or a NaN loss later. Keys bounded by nature (probabilities, fractions, decays) say so
# in their own checks.
MAX_EPOCHS = 10_000  # train.epochs and train.warmup_epochs: fine-tunes run tens to hundreds of epochs
MAX_BATCH_SIZE = 65_536  # train.batch_size and micro_batch_size: the largest published ImageNet batches (LARS)
# data.image_size and train_image_size, px per side: timm's largest pretrained inputs are 1024; one decoded
# 4096 x 4096 image is 50 MB, a batch of 64 of them 3 GB before the model sees it.
MAX_IMAGE_SIZE = 4096
# data.num_workers, loader processes per training process. A recipe travels between machines, so the bound
# is not this machine's core count (the default, null, follows that): no node has more than ~256 cores,
# and every worker is a process with its own copy of the dataset's index and open files.
MAX_NUM_WORKERS = 256
MAX_LR = 10.0  # optim.lr: fine-tunes use 1e-5 to 0.1; SGD at huge batches (LARS) peaks near 10; lbfgs's scale is 1
MAX_LR_MULT = 1000.0  # optim.head_lr_mult and each optim.lr_mult value: ratios between groups' learning rates
MAX_WEIGHT_DECAY = 10.0  # optim.weight_decay: AdamW's decoupled decay is 0.01-0.5; lbfgs's L2 strength rarely 1
MAX_COLOR_JITTER = 1.0  # data.color_jitter: brightness factors in [1 - j, 1 + j]; above 1 the low end is black
MAX_SEED = 2**32 - 1  # train.seed: numpy's np.random.seed, which libraries call in loader workers, takes [0, 2**32)
MAX_GRAD_CLIP = 1e6  # train.grad_clip, a global norm: no fine-tune's gradient norm comes near; it would never clip
MAX_HARD_EXAMPLES = 1000  # train.hard_examples: images per split drawn into one PNG grid
# freeze.stages and freeze.phases values: more than any timm model's group_matcher gives (the deepest ViTs
# have ~50 blocks); the backbone's own count is checked when it is built (model/groups.py).
MAX_STAGES = 1000
MAX_EARLY_STOP_DELTA = 1e6  # train.early_stop.min_delta: accuracies are fractions; a loss in the millions is lost
MAX_MIX_ALPHA = 100.0  # train.mixup and train.cutmix: Beta(alpha, alpha); from ~10 on the weight is always ~0.5


@dataclass(frozen=True)
class ModelConfig:
    # required: a timm model name (`timm.list_models()`), e.g. resnet50, vit_small_patch16_224; or
    # custom:NAME, a label for a module of one's own passed in Python (finetune.train(recipe, model=...)).
    backbone: str = ""
    # true: timm's default weights (hub or local HF cache); false: random init; or a weights file:
    # a path (.safetensors, .pth, .pt, .bin) or `package:DIST_MODULE/path/in/package.pth` for weights
    # shipped inside an installed Python package.
    pretrained: Union[bool, str] = True
    drop_path_rate: float = 0.0  # stochastic depth for ViTs/ConvNeXts; 0.1 helps long fine-tunes of big models
    # The head (it learns at lr x head_lr_mult): module or parameter names, e.g. [fc] or [head.proj, head.norm].
    # Empty: the model's own `head_names` attribute, else timm's get_classifier(). Mostly for a module of
    # one's own without either.
    head: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DataConfig:
    # required: a source: a folder (one subfolder per class), a .csv/.jsonl manifest, hf:NAME_OR_DIR[@split],
    # torchvision:NAME[@train|test] or sklearn:digits (grammar: locate.parse_source)
    train: str = ""
    val: str | None = None  # none: a stratified, seeded split of train (val_fraction of every class)
    test: str | None = None  # evaluated once after training, with the best epoch's weights; none: no test
    val_fraction: float = 0.2  # share of each class held out when `val` is absent
    image_size: int | None = None  # pixels (square); none: the backbone's pretrained input size
    # Training crops at a lower resolution than evaluation (FixRes, Touvron et al. 2019: random-resized crops
    # make objects look larger in training, so a smaller training size matches the eval view and costs
    # about half the compute). auto: 3/4 of image_size, in multiples of 32, for convolutional backbones from
    # 128 px up; ViTs (a fixed input size) and small inputs train at image_size. none: image_size.
    train_image_size: Union[int, Literal["auto"], None] = "auto"
    # Eval-time centre crop: resize to image_size / crop_pct, crop image_size. none: the backbone's (often
    # 0.875); 1.0 keeps the whole image, right when objects touch the border (digits, documents).
    crop_pct: float | None = None
    # Resampling filter for resizes; none: the backbone's (usually bicubic). bilinear is smoother when
    # upsampling very small images (bicubic overshoots at hard edges).
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    # Training augmentation, passed to timm's create_transform. Gentle enough for small datasets.
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range, as in timm's train.py
    hflip: float = 0.5  # probability; set 0 when a mirror image means something else (digits, text)
    color_jitter: float = 0.4  # brightness/contrast/saturation strength; 0 turns it off
    auto_augment: str | None = None  # a timm policy string such as rand-m9-mstd0.5; none: off
    # false: training images get the eval transform too (no random crop, flip or jitter), e.g. to compare a
    # run against one that trains on cached features.
    augment: bool = True
    num_workers: int | None = None  # loader processes per training process; none: min(8, cores / processes - 1)
    # hf: and manifests: the column holding images (or image paths) and the one holding labels. none: found
    # automatically (an Image feature and a ClassLabel; else a column named image/path/file, label/class).
    image_column: str | None = None
    label_column: str | None = None
    root: str = "data"  # folder holding torchvision:NAME datasets, relative to the working directory
    download: bool = False  # torchvision only: fetch missing files into root; off so a run never downloads by surprise
    # An unreadable, truncated or empty image file: skip (listed in data_report.json; the run goes on) or
    # error (every image is decoded once before training and all bad files are listed; nothing is written).
    on_bad_image: Literal["skip", "error"] = "skip"
    # shuffle: each image once per epoch. balanced: every class drawn equally often (with replacement), for
    # data where rare classes matter as much as common ones.
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    # When nothing before the head trains in any phase (a linear probe: freeze.backbone with BatchNorm held),
    # auto runs the body once per image and trains the head on its cached outputs, 20x+ faster per epoch;
    # none always runs the whole model. The plan printout says which.
    feature_cache: Literal["auto", "none"] = "auto"
    # Views per training image whose features are cached: 1 is the eval transform (the usual linear probe);
    # K > 1 adds K - 1 augmented views made once, and each epoch draws one view per image.
    feature_views: int = 1
    # decoded: every image is decoded once, at the size the eval transform resizes to, into a memory-mapped
    # uint8 file reused by later epochs and runs; loader workers cut crops from it and flips, colour jitter and
    # normalisation run batched on the training device. none: PIL decodes and augments every image every
    # epoch in loader workers. auto: decoded when the cache fits (25% of RAM, half the free disk) and the
    # augmentation can run on the device (not with data.auto_augment); the set-up printout says which and why.
    cache: Literal["auto", "none", "decoded"] = "auto"
    # Where caches live between runs, keyed by the data's and the backbone's identity (never inside the
    # dataset folder); none: $XDG_CACHE_HOME/finetune, else ~/.cache/finetune.
    cache_dir: str | None = None


@dataclass(frozen=True)
class OptimConfig:
    # adamw, sgd: torch's fused kernels. lbfgs: a linear probe's head fitted as an L2-regularised logistic
    # regression on the whole training set of cached features (full-batch L-BFGS with line search, as
    # CLIP-style probes do); only for a body that never changes, and weight_decay is then the L2 coefficient
    # on the mean loss. Any other name is one of timm's optimizers (lamb, lion, adafactor, ...;
    # timm.optim.list_optimizers()), over the same groups with the same explicit lr and weight decay.
    name: str = "adamw"
    # The backbone's peak learning rate (the head gets lr × head_lr_mult). None: the optimizer's usual
    # fine-tuning scale (OPTIMIZER_DEFAULTS below), 3e-4 for adamw and 0.01 for sgd, at batch_size 64;
    # lbfgs: its step scale, 1. Required for timm's optimizers without a default there.
    lr: float | None = None
    head_lr_mult: float = 10.0  # the new head learns this many times faster than the pretrained body
    # None: 0.05 for adamw (decoupled decay), 1e-4 for sgd (L2). Never applied to norms and biases.
    weight_decay: float | None = None
    momentum: float = 0.9  # sgd's (Nesterov), and timm's optimizers that take a momentum
    # Layer-wise LR decay in (0, 1] (BEiT/MAE): the top body block learns at lr, each block below at
    # layer_decay times the one above; blocks come from timm's group_matcher(coarse=False). None: off.
    # 0.65-0.75 suits ViTs; convnets need less (0.8-0.9). The head sits head_lr_mult above the top block.
    layer_decay: float | None = None
    # LR multipliers by parameter-name glob, e.g. {"stem.*": 0.1}; several matches multiply. A glob that
    # matches no parameter is an error (it is almost always a typo).
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FreezeConfig:
    # true: the whole body is frozen, only the head trains (a linear probe; BatchNorm follows `bn`).
    backbone: bool = False
    # Freeze the first N groups of timm's group_matcher(coarse=True): the stem, then stages (convnets)
    # or blocks (ViTs). `finetune plan` shows the stage of every group. 0: none.
    stages: int = 0
    # Parameter-name globs (fnmatch) frozen for the whole run, e.g. ["patch_embed.*", "*.norm*"].
    patterns: list[str] = field(default_factory=list)
    # BatchNorm inside frozen parts. eval: running statistics fixed (module in eval mode), the affine trains
    # and absorbs a domain shift; the frozen part computes the same function on any number of devices and
    # at any batch size. train: batch statistics, running statistics and affine all update (fastai's
    # train_bn). frozen: statistics and affine fixed, bit for bit as loaded. auto (default): frozen for a
    # linear probe (freeze.backbone for the whole run: the body never changes, its features are computed
    # once), eval otherwise. Measurements: docs/strategies.md.
    bn: Literal["auto", "train", "eval", "frozen"] = "auto"
    # Gradual unfreezing. unfreeze_at E: what backbone/stages froze trains from epoch E (0-based: after
    # E finished epochs), fastai-style. phases {EPOCH: STAGES}: from EPOCH on, only the first STAGES
    # stages stay frozen, e.g. {0: 4, 2: 2, 4: 0}; stages may only thaw. Both none/empty: no phases.
    unfreeze_at: int | None = None
    phases: dict[int, int] = field(default_factory=dict)

    def batch_norm(self) -> str:
        """`bn` with auto decided: frozen when the whole body stays frozen for the whole run, else eval."""
        if self.bn != "auto":
            return self.bn
        return "frozen" if self.backbone and self.unfreeze_at is None and not self.phases else "eval"


@dataclass(frozen=True)
class EarlyStopConfig:
    # The validation metric watched, of the better of the model and its moving average (the export's pick
    # for the task's selection metric): val_acc, val_balanced_acc, val_map and val_r2 should rise, val_loss,
    # val_mae and val_rmse fall. One the task writes: val_acc/val_balanced_acc for single_label, val_map for
    # multi_label, val_mae/val_rmse/val_r2 for regression; val_loss for any.
    metric: Literal["val_acc", "val_balanced_acc", "val_loss", "val_map", "val_mae", "val_rmse", "val_r2"] = "val_acc"
    patience: int = 5  # epochs in a row without improvement after which the run stops (and finishes as usual)
    min_delta: float = 0.0  # in the metric's unit (a fraction for accuracies): a change this small is no improvement


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    # The new head's start. zero: all-zero weights (equal logits, the body's first gradients are small).
    # probe: fitted first as a logistic regression on the pretrained body's features, computed once (LP-FT),
    # so the body never trains under a head that does not yet separate the classes; auto: probe when the
    # weights are pretrained and the body trains. zero is the default: probe helped on flowers17 photos
    # but cost 0.8 points on the digits quickstart and let 48 photos overfit after epoch 1 (docs/defaults.md).
    head_init: Literal["auto", "zero", "probe"] = "zero"
    # An exponential moving average of the weights, validated every epoch next to the model itself; the
    # better of the two is exported (metrics.jsonl: ema_val_acc, exported). auto: a half-life of a tenth of
    # the run's updates, so it follows a short fine-tune; a number: that decay per update; none: off.
    ema: Union[float, Literal["auto"], None] = "auto"
    # Global: images per optimizer update, summed over all processes. auto: 64, halved (down to 8) until an
    # epoch has at least 16 updates, so a few hundred photos still get enough updates (printed at start).
    batch_size: Union[int, Literal["auto"]] = "auto"
    # Images one device holds in one forward/backward pass; none: batch_size / processes. When smaller,
    # gradient accumulation fills the global batch, so the recipe trains the same on 1 GPU or 8.
    micro_batch_size: int | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    seed: int = 0  # one seed for model init, data order, split and augmentation
    warmup_epochs: float = 1.0  # linear warmup, then cosine to zero; protects the body from the random head
    # Cross-entropy smoothing; regularises small fine-tuning sets. task multi_label: each label's binary
    # target moves toward 1/2 (1 - s/2 and s/2, as YOLOv5's smooth_BCE), which leaves the ranking mAP reads.
    label_smoothing: float = 0.1
    grad_clip: float | None = None  # max global gradient norm; none: no clipping
    # auto: weigh each class's loss by inverse frequency (N / (classes x count)), so rare classes count as much
    # as common ones; none: every image weighs the same. task multi_label: auto weighs each label's positives
    # by its negatives / positives in train (BCE pos_weight), so a rare label's misses cost as much as its
    # false alarms.
    class_weights: Literal["none", "auto"] = "none"
    # task multi_label only: the probability from which a label is predicted. Micro/macro F1 are read at it,
    # and the export's config.json records it for `finetune predict` (which may override it).
    threshold: float = 0.5
    # task regression only (the classification tasks train with cross-entropy): mse, the mean squared error
    # of the standardised targets; huber, quadratic within one standard deviation and linear beyond, so a
    # few wrong targets pull less. null: mse.
    loss: Literal["mse", "huber"] | None = None
    # After training: this many highest-loss train and val images (the likely label errors) go into
    # hard_examples.json and a PNG grid; 0 skips the extra inference pass over train and val.
    hard_examples: int = 24
    # Checkpoints inside an epoch, besides the one after each epoch: a number of optimizer updates (500) or
    # a duration of training (15min, 90s, 2h); null: after each epoch only. A kill loses at most this much
    # work, and --resume continues mid-epoch with the batches, augmentation and weights of an uninterrupted
    # run. 15min: a long GPU epoch is covered, a short one never pauses for it.
    checkpoint_every: Union[int, str, None] = "15min"
    # BatchNorm statistics over the whole global batch instead of each device's share (several GPUs only):
    # worth it when the per-device batch is small (under ~16); costs a synchronisation per BatchNorm layer.
    sync_bn: bool = False
    # Images and conv weights in NHWC layout, which tensor cores and oneDNN prefer. none: on for
    # convolutional nets (GPU and CPU), off for ViTs (one patch-embedding conv gains nothing).
    channels_last: bool | None = None
    # torch.compile (inductor) of the model, through Accelerate: faster steps on GPUs after a one-off
    # compilation of a minute or more, printed with the first epoch (compile_seconds in metrics.jsonl).
    compile: bool = False
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of training micro-batches, through timm's Mixup:
    # each the alpha of the Beta(alpha, alpha) that draws the mixing weight; 0 turns it off (default: off,
    # a small fine-tune learns fine without). timm's ImageNet recipes use mixup 0.8, cutmix 1.0; 0.2 is gentle.
    # Targets become soft (label_smoothing folded in) and the loss timm's SoftTargetCrossEntropy; validation,
    # test and hard examples use the plain labels. Needs an even number of images per micro-batch.
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0  # share of training micro-batches mixed at all (the rest train on plain images)
    mix_switch_prob: float = 0.5  # with both mixup and cutmix on: share of mixed micro-batches that use cutmix
    # Stop after early_stop.patience epochs without improvement of early_stop.metric; the run then finishes
    # as at its last epoch (the best epoch's export, the scoring after training, the model card) and cannot
    # be resumed. null (default): every epoch of train.epochs runs; the export is the best epoch's anyway.
    early_stop: EarlyStopConfig | None = None
    # Experiment trackers, through Accelerate's own tracker support: each update's loss and the groups' LRs,
    # each epoch's metrics, the recipe as hyperparameters. TensorBoard files go to RUN_DIR/tensorboard;
    # the others need their package installed and configured as it documents (e.g. WANDB_PROJECT).
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio"]] = \
        field(default_factory=list)


@dataclass(frozen=True)
class RecipeConfig:
    # single_label: one class per image (softmax, cross-entropy, accuracy). multi_label: any number of labels
    # per image, none included (a sigmoid per label, binary cross-entropy, mAP and F1 at train.threshold; the
    # best epoch is the one with the best val mAP). Labels: `a|b` in a CSV manifest, a list in JSONL, an HF
    # Sequence(ClassLabel) column or label lists in Python. regression: a number per image (a manifest
    # column, an HF column of numbers, Python numbers), standardised for training, train.loss mse or huber;
    # MAE, RMSE and R² in the user's units, the best epoch the one with the lowest val MAE. data.sampler
    # balanced, optim lbfgs, train.head_init probe and mixing are single-label ideas and are refused by the
    # others; a frozen body runs every epoch (its features are cached only for a softmax head). The Python
    # API also takes a task of one's own (finetune.train(task=...), finetune/tasks/).
    task: Literal["single_label", "multi_label", "regression"] = "single_label"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


REQUIRED = {"model.backbone": "a timm model name", "data.train": "a data source"}
TOP_LEVEL_KEYS = ("task",)  # keys of the recipe itself, not of a section: an override names them without a dot
# Per-optimizer defaults for `optim.lr` and `optim.weight_decay` when a recipe leaves them out.
# lion (timm's): its sign update moves every weight by the full LR, so the Lion paper (Chen et al. 2023)
# pairs it with an LR 3-10x below AdamW's and a weight decay 3-10x above (their product sets the decay's
# strength): AdamW's defaults divided and multiplied by 10. Other timm optimizers need both given.
OPTIMIZER_DEFAULTS = {"adamw": {"lr": 3e-4, "weight_decay": 0.05}, "sgd": {"lr": 0.01, "weight_decay": 1e-4},
                      "lbfgs": {"lr": 1.0, "weight_decay": 1e-3}, "lion": {"lr": 3e-5, "weight_decay": 0.5}}

RecipeLike = Union[str, Path, dict, RecipeConfig]  # what load_recipe and the API accept
