"""The run config's sections as dataclasses: every knob, its default and which model family reads it.

Plain dataclasses, so a run's resolved config is written next to its logs and read back unchanged
(`isolocal.config.parse`); ranges are checked by `isolocal.config.validate`.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any, Union

from isolocal.config.head_options import FORMER_KEYS, resolve_options, set_former_key

Boundary = Union[str, float, list]
Objective = Union[str, list]


@dataclass
class ModelConfig:
    """A model of one family ("vit", "swin" or "resnet"): its encoder, the taps that cut it into stages,
    the local head of each stage and the masks.

    One flat union of the families' fields, so configs and checkpoints store plain `model.<key>`
    entries. Each family reads only the fields `FAMILY_FIELDS` lists for it (the comments below say
    which); validation refuses a non-default value of a field the chosen family ignores.
    """

    arch: str = "vit"  # "vit" | "swin" | "resnet"
    img_size: int = 224
    in_chans: int = 3
    # ViT and Swin: patch side in pixels, token width (Swin: of its first stage, doubled per stage).
    patch_size: int = 16
    embed_dim: int = 768
    # ViT only: transformer blocks and attention heads.
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0  # ViT and Swin
    drop_path_rate: float = 0.0
    # Swin and ResNet: blocks per stage (Swin stage / timm ResNet `layerN`); Swin only: heads and window (tokens).
    depths: list[int] = field(default_factory=list)
    stage_heads: list[int] = field(default_factory=list)
    window_size: int = 7
    # Swin only: eps of every encoder LayerNorm (timm's and SimMIM's 1e-5; the LocalMIM-Swin presets 1e-6).
    swin_norm_eps: float = 1e-5
    # ResNet only: residual block, output width of each timm stage (before a bottleneck's x4), stem.
    block: str = "basic"  # "basic" | "bottleneck" (timm's BasicBlock / Bottleneck)
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    stem: str = "imagenet"  # "imagenet" (timm's 7x7/2 conv + 3x3/2 max pool) | "cifar" (3x3/1 conv, no pool)
    # Every family: 0-based block index of each tap (a ResNet's blocks are its residual blocks).
    taps: list[int] = field(default_factory=lambda: [1, 3, 9, 11])
    # ViT and Swin, read by `mim` heads: output scale of each tap's decoder, the target, the decoders.
    scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    target: str = "hog"  # "hog" | "pixels"
    hog_nbins: int = 9
    hog_bias: bool = False
    hog_bias_seed: int = 0
    decoder_dim: list[int] = field(default_factory=lambda: [256])  # one value or one per tap
    decoder_depth: int = 1
    decoder_heads: list[int] = field(default_factory=lambda: [8])  # one value or one per tap
    decoder_mlp_ratio: float = 4.0
    # ViT and Swin: ratio of masked tokens, mask-unit side in patches, one mask per batch or per image.
    mask_ratio: float = 0.75
    mask_unit: int = 1
    mask_per_batch: bool = False
    # Every family: "global", "isolated", an alpha in [0, 1], or a list with one entry per boundary.
    boundary: Boundary = "global"
    # Swin only: dense (SimMIM-style) encoders keep mask tokens inside the encoder.
    dense_encoder: bool = False
    # Every family: local objective of each stage (isolocal.heads): "mim" | "classify" | "contrastive" | a
    # head of one's own, or one per stage (a ResNet has no decoder, so no "mim").
    objective: Objective = "mim"
    # Every family: each head's own options, one table per head, for every stage it trains
    # ([model.head_options.contrastive] temperature = 0.2; isolocal.config.head_options).
    head_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The shipped heads' options as 0.2's flat keys: accepted, moved into head_options (`FORMER_KEYS`).
    num_classes: InitVar[Any] = None
    head_hidden: InitVar[Any] = None
    proj_dim: InitVar[Any] = None
    temperature: InitVar[Any] = None

    def __post_init__(self, num_classes: Any, head_hidden: Any, proj_dim: Any, temperature: Any) -> None:
        given = {"num_classes": num_classes, "head_hidden": head_hidden, "proj_dim": proj_dim,
                 "temperature": temperature}
        for key, value in given.items():
            if value is not None:
                set_former_key(self, key, value)


class _FormerKey:
    """A 0.2 flat key as a ModelConfig attribute: reading gives its first head's resolved option (the
    head's module imported), setting writes every one of its heads' tables."""

    def __init__(self, key: str):
        self.key = key

    def __get__(self, model: ModelConfig | None, owner: type | None = None) -> Any:
        if model is None:
            return None  # the class attribute: the init-only argument's default
        head = FORMER_KEYS[self.key][0]
        options = resolve_options(model, head)
        if options is None:
            raise AttributeError(f"model.{self.key} is an option of the {head!r} head "
                                 f"(model.head_options.{head}.{self.key}), registered by importing isolocal.heads")
        return getattr(options, self.key)

    def __set__(self, model: ModelConfig, value: Any) -> None:
        set_former_key(model, self.key, value)


for _key in FORMER_KEYS:
    setattr(ModelConfig, _key, _FormerKey(_key))

# The former flat head keys are accepted by every family (into head_options).
_EVERY_FAMILY = ("arch", "img_size", "in_chans", "drop_path_rate", "taps", "boundary", "objective", "head_options",
                 *FORMER_KEYS)
_TOKEN_FAMILIES = ("patch_size", "embed_dim", "mlp_ratio", "scales", "target", "hog_nbins", "hog_bias",
                   "hog_bias_seed", "decoder_dim", "decoder_depth", "decoder_heads", "decoder_mlp_ratio",
                   "mask_ratio", "mask_unit", "mask_per_batch")
# The ModelConfig fields each family reads; every other field keeps its default for that family.
FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "vit": _EVERY_FAMILY + _TOKEN_FAMILIES + ("depth", "num_heads"),
    "swin": _EVERY_FAMILY + _TOKEN_FAMILIES + ("depths", "stage_heads", "window_size", "swin_norm_eps", "dense_encoder"),
    "resnet": _EVERY_FAMILY + ("depths", "block", "channels", "stem"),
}


@dataclass
class DataConfig:
    """Which images a run reads and how they are augmented (`isolocal.data`)."""

    name: str = "fashion_mnist"  # "fashion_mnist" | "folder" | "synthetic"
    root: str = ""  # "" -> the dataset's default location
    synthetic_size: int = 512
    num_workers: int = 0
    # With num_workers = 0: the next batches are prepared in one background process that draws the
    # same augmentations as in-process, so the batches are identical; for a core the training leaves
    # free (a GPU run). Off: on a CPU whose cores all train it costs more than it saves
    prefetch: bool = False
    crop_scale_min: float = 0.2
    train_subset: int = 0  # > 0: pre-train on the first N training images only (quick CPU recipes)
    pad: int = 0  # zero pixels added on every side before the resize/crop (Fashion-MNIST 28 + 2 * 2 = 32 px)


@dataclass
class TrainConfig:
    """Pre-training: schedule, optimizer, precision, checkpoints, logging and online probes."""

    epochs: int = 1
    max_steps: int = 0  # > 0 stops after this many steps (smoke runs, benchmarks); the lr schedule still spans epochs
    batch_size: int = 256  # global batch per optimizer step
    accum_steps: int = 1
    base_lr: float = 2e-4  # lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 1.0
    clip_grad: float = 0.0  # per stage; 0 disables
    stage_lr_scale: list[float] = field(default_factory=list)  # optional lr multiplier per stage
    per_stage_optimizers: bool = False
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU) | "bf16" | "fp16" | "off"
    seed: int = 0
    log_every: int = 10
    ckpt_every_epochs: int = 1
    ckpt_every_steps: int = 0  # > 0: also save last.pt every N optimizer steps (mid-epoch; resumes exactly)
    ckpt_every_minutes: float = 0.0  # > 0: also save last.pt when this much time passed since the last save
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" that step's update
    nonfinite_max_skips: int = 10  # "skip": stop after this many consecutive skipped steps
    keep_last: int = 2
    analysis_every: int = 0  # > 0: NMI / attention distance on a probe batch every N steps
    knn_every_epochs: int = 0  # > 0: online k-NN every N epochs
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = False  # torch.compile each stage (and its decoder) in place; state-dict keys unchanged
    # Recompute each stage's encoder forward in backward (torch.utils.checkpoint): the end-to-end memory baseline.
    grad_checkpoint: bool = False
    tensorboard: bool = False  # also log every record to TensorBoard (<out_dir>/tensorboard; needs `tensorboard`)


@dataclass
class PipelineConfig:
    """DeepSpeed pipeline parallelism over the model's stages (`isolocal.train.pipeline`)."""

    stages: int = 0  # pipeline ranks; 0 = no pipeline
    micro_batches: int = 4
    # "auto" (isolated when every boundary is isolated, else 1f1b) | "isolated" | "1f1b" ("default" = "1f1b")
    schedule: str = "auto"
    timeout_s: int = 120
    partition: str = "count"  # stages per rank: "count" (balanced parameter counts) | "cost" (measured time)
    profile: bool = False  # per-rank time breakdown and a Chrome trace in out_dir (pipeline_profile.*)


# `isolocal eval` protocols (`isolocal.eval.protocols.evaluate`) and the image sources analysis reads
# (`isolocal analyze --images`, a study's `images`): here, so the command line knows them without the library.
EVAL_MODES = ("knn", "linear", "head", "finetune")
IMAGE_SPEC_HELP = "fmnist:<test indices, e.g. 0,5,17> | skimage:<names, e.g. astronaut,coffee> | <image folder>"


@dataclass
class EvalConfig:
    """Evaluation protocols: k-NN, linear probe and fine-tuning (`isolocal.eval`)."""

    feature: str = "cls"  # "cls" | "mean"
    knn_k: int = 20
    knn_t: float = 0.07
    linear_epochs: int = 10
    linear_lr: float = 0.1
    linear_batch_size: int = 256  # also the feature-extraction batch
    linear_optimizer: str = "sgd"  # any timm optimizer name: "sgd" (Nesterov momentum 0.9), "adamw", "lars", ...
    warmup_epochs: float = 1.0  # linear warmup before the cosine decay (linear probe and fine-tuning)
    finetune_epochs: int = 10  # the epoch with the best validation top-1 is the one tested
    finetune_patience: int = 0  # > 0: stop after this many epochs without a better validation top-1
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 64
    finetune_weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    num_classes: int = 10
    train_subset: int = 0  # > 0: use only the first N training images (validation included)
    test_subset: int = 0  # > 0: the first N test images; 0 = the whole test split
    val_fraction: float = 0.1  # of the labelled training images, held out for every selection
    val_seed: int = 0  # which images: the same split for every run and seed of a study


@dataclass
class RunConfig:
    """A whole run: which preset, its overrides, the data, the optimizer and where to write."""

    preset: str = "localmim_vit_nano"
    out_dir: str = "runs/default"
    # Modules and .py files imported before anything else, in every process of the run (heads of one's own:
    # `isolocal.config.imports`); written resolved, files as absolute paths.
    imports: list[str] = field(default_factory=list)
    model: ModelConfig | None = None  # None -> the preset's config
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
