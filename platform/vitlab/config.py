"""JobConfig: the one typed config that flows from the CLI to every component.

A job is a YAML file (``jobs/*.yaml``) plus dotted ``key=value`` overrides (``optim.lr=3e-4``). Both are
checked here, once, before Ray starts: unknown keys get close matches, bad values name the dotted key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitlab.errors import ConfigError
from vitlab.names import RULE, is_safe_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    path: str = "data/digits"
    image_size: int = Field(224, ge=8)
    # Val: resize the shorter side to image_size / crop_pct, then center-crop (timm/DeiT: 0.875).
    crop_pct: float = Field(0.875, gt=0.0, le=1.0)
    # Train: RandomResizedCrop(image_size, scale, ratio) + horizontal flip.
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    randaugment: str | None = None  # timm string, e.g. "rand-m9-mstd0.5-inc1"
    # Resampling of every resize, train and val (DeiT and timm's ViTs: bicubic); exports record it.
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # Random erasing (timm's RandomErasing, DeiT: 0.25 / pixel / 1) on the device: with probability reprob, 1..recount
    # rectangles of random pixels ('pixel'), one random colour each ('rand') or zeros ('const').
    reprob: float = Field(0.0, ge=0.0, le=1.0)
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = Field(1, ge=1)
    repeated_aug: int = Field(1, ge=1)  # DeiT's RASampler: each image k times an epoch (same epoch length)
    # Epochs back to back in one Ray Data execution, decoded by a pool of actors (docs/data.md)
    back_to_back: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    shuffle_buffer: int = Field(0, ge=0)  # rows of a shuffle buffer on the stream's batches (0 = off; costs speed)
    prefetch_batches: int = Field(4, ge=0)
    block_rows: int = Field(512, ge=1)  # rows per block from a decode task (Ray costs per block, not row)
    decode_cpus: float = Field(1.0, gt=0.0)  # CPUs per decode task; below 1 on small machines, beside the workers
    # Where train JPEGs are decoded: cpu (the Ray Data tasks, PIL) or gpu (the training device, nvJPEG: for nodes with
    # few CPUs per GPU; needs CUDA workers and no randaugment; val stays on cpu). docs/data.md
    decode: Literal["cpu", "gpu"] = "cpu"
    # Keep the stream order identical between runs (a little slower); augmentation is seeded either way.
    deterministic: bool = False

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"expected 0 < low <= high, got {list(v)}")
        return v


class ModelConfig(Section):
    name: str = "vit_tiny_patch16_224"
    # Passed to timm.create_model as is (img_size, patch_size, embed_dim, depth, num_heads, ...).
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # Start from these weights (fine-tuning): a timm state_dict, a vitlab best_model.pt, checkpoint_* or run dir
    # (local or s3://), or an MLflow model URI. Weights only; the head is reset when the class count differs,
    # the position embeddings resampled when the patch grid does. Model-hub names are refused (no downloads).
    init_from: str | None = None


class OptimConfig(Section):
    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = Field(5e-4, gt=0.0)
    # Multiply lr by global batch / 512 (DeiT's rule).
    scale_lr: bool = False
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    warmup_epochs: float = Field(5.0, ge=0.0)
    warmup_lr: float = Field(1e-6, ge=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0)
    cutmix: float = Field(0.0, ge=0.0)
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0)
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    clip_grad: float | None = Field(None, gt=0.0)
    accum_steps: int = Field(1, ge=1)
    # Layer-wise lr decay (fine-tuning, BEiT/timm): block i's lr x layer_decay ** (depth - i), the patch
    # embedding's x layer_decay ** (depth + 1), the head's x 1.
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)  # global, split over workers
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    log_every_steps: int = Field(50, ge=1)  # train_loss_step and lr_step to MLflow, live
    # Rank 0's progress line (step, images/s, data wait, loss, lr, ETA) every this many seconds; 0 = off.
    log_every_seconds: float = Field(30.0, ge=0.0)
    # [start, end]: a torch.profiler trace of optimizer steps start..end-1 on rank 0, to MLflow (profile/).
    profile_steps: tuple[int, int] | None = None
    # Batch size for evaluation, global (defaults to train.batch_size).
    eval_batch_size: int | None = Field(None, ge=1)
    # Model EMA (timm's ModelEmaV3), updated after every optimizer step; 0 = off. With ema_warmup the decay
    # ramps up as 1 - (1 + step) ** -2/3, capped at ema_decay (early steps average over few updates).
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    ema_warmup: bool = False

    @field_validator("profile_steps")
    @classmethod
    def _window(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"expected [start, end] with 0 <= start < end, got {list(v)}")
        return v


class ScalingSection(Section):
    # N, or [min, max]: elastic, resized towards max every resize_check_seconds, the same global batch on any count
    num_workers: int | tuple[int, int] = 2
    resize_check_seconds: float = Field(60.0, gt=0.0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    accelerator_type: str | None = None
    # PACK fills a node first (fastest DDP); SPREAD and STRICT_SPREAD (waits for one node per worker) spread the
    # workers over nodes, e.g. one per multi-GPU node with gpus_per_worker set to the node's GPU count.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (v, v) if isinstance(v, int) else v
        if not 1 <= low <= high:
            raise ValueError(f"expected N >= 1 or [min, max] with 1 <= min <= max, got {v}")
        return v

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:  # a [min, max] range with min < max
        return not isinstance(self.num_workers, int) and self.num_workers[0] < self.num_workers[1]


class TrackingConfig(Section):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir
    experiment: str = "vitlab"
    system_metrics: bool = True


class RunSection(Section):
    name: str | None = None  # default: derived from the job file's name
    storage_path: str = "runs"
    checkpoint_every: int = Field(1, ge=1)
    # Also every this many optimizer steps inside an epoch (0 = off): a restart resumes at the exact image.
    checkpoint_every_steps: int = Field(0, ge=0)
    # async: uploaded in the background while training goes on; sync: training waits for the upload.
    checkpoint_upload: Literal["sync", "async"] = "async"
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    # Restarts after a node is reclaimed (a spot preemption), counted apart from max_failures; -1 = unlimited.
    max_preemption_failures: int = Field(-1, ge=-1)
    # Every this many steps ask Ray Train whether a node is about to be reclaimed (0 = never): checkpoint in time.
    preemption_check_every_steps: int = Field(10, ge=0)
    # Which weights become best_model.pt (and which metric ranks the kept checkpoints): the live weights'
    # val_top1, or the EMA weights' val_top1_ema (needs train.ema_decay > 0).
    best_by: Literal["val_top1", "val_top1_ema"] = "val_top1"

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str | None) -> str | None:
        # run.name is a folder under storage_path: '../x' must not write outside it
        if v is not None and not is_safe_name(v):
            raise ValueError(f"bad name ({RULE})")
        return v


class JobConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _batch_divides(self) -> JobConfig:
        if self.train.batch_size % self.scaling.max_workers:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} is the global batch and must divide evenly "
                f"over scaling.num_workers={self.scaling.max_workers}"
            )
        return self

    @model_validator(mode="after")
    def _mid_epoch_position(self) -> JobConfig:
        if self.positional_stream and self.data.shuffle_buffer:
            raise ValueError("data.shuffle_buffer must be 0 with run.checkpoint_every_steps or elastic workers: a "
                             "mid-epoch position needs the epoch's order (shards and rows are shuffled already)")
        return self

    @property
    def positional_stream(self) -> bool:
        """Each worker reads its own piece of the epoch, in order (data/positions.py): for an exact position."""
        return self.run.checkpoint_every_steps > 0 or self.scaling.elastic

    @model_validator(mode="after")
    def _ema_for_best_by(self) -> JobConfig:
        if self.run.best_by == "val_top1_ema" and not self.train.ema_decay:
            raise ValueError("run.best_by=val_top1_ema needs model EMA: set train.ema_decay (e.g. 0.9998)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Every value under its dotted key (``optim.lr``): MLflow params, sweep keys."""
        return flatten(self.to_dict())

    def with_overrides(self, overrides: dict[str, Any], source: str = "override") -> JobConfig:
        """A copy with dotted keys replaced, validated like a file."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value, source)
        return validate(raw, source)

    @classmethod
    def from_yaml(cls, text: str, source: str, overrides: list[str] | dict[str, Any] | None = None) -> JobConfig:
        """The one loader: YAML text (a job file, a checkpoint's config.yaml, an MLflow artifact) plus
        overrides, validated once. ``source`` names the text in errors."""
        return cls.from_raw(parse_yaml(text, source) or {}, source, overrides)

    @classmethod
    def from_raw(cls, raw: Any, source: str, overrides: list[str] | dict[str, Any] | None = None) -> JobConfig:
        over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
        if isinstance(raw, dict):  # anything else is refused by validate, naming the source
            for key, value in over.items():
                _set_dotted(raw, key, value, f"{source} (override {key})")
        return validate(raw, source)


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _free_form(model: type[BaseModel], name: str) -> bool:
    """Fields typed as dicts (model.kwargs) accept any key below them."""
    return "dict" in str(model.model_fields[name].annotation)


def known_keys(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """All valid dotted keys of the schema, e.g. ``optim.lr``, ``model.kwargs``."""
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(known_keys(sub, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def check_key(key: str, source: str) -> None:
    """Raise a ConfigError naming ``key`` and its nearest valid keys if it is not in the schema."""
    model: type[BaseModel] = JobConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            break
        sub = model.model_fields[part].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            model = sub
            continue
        if i == len(parts) - 1 or _free_form(model, part):
            return
        break
    valid = known_keys()
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid sections: {_sections()}"
    raise ConfigError(f"{source}: unknown key '{key}'{hint}")


def _sections() -> str:
    return ", ".join(JobConfig.model_fields)


def _check_keys(raw: dict[str, Any], source: str, model: type[BaseModel] = JobConfig, prefix: str = "") -> None:
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if not isinstance(k, str) or k not in model.model_fields:
            check_key(key, source)  # raises with close matches
        sub = model.model_fields[k].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping of {sub.__name__} keys, got {v!r}")
            _check_keys(v, source, sub, key + ".")


def validate(raw: dict[str, Any], source: str) -> JobConfig:
    """Validate a raw dict into a JobConfig; every problem becomes one ConfigError line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({_sections()}), got {type(raw).__name__}")
    _check_keys(raw, source)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "(job)"
        given = err.get("input")
        given_s = "" if isinstance(given, dict) else f", got {given!r}"
        raise ConfigError(f"{source}: {key}: {err['msg']}{given_s}") from None


def parse_value(text: str) -> Any:
    """Coerce an override's text the way YAML would ('3' -> 3, 'true' -> True, '[1, 2]' -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected dotted.key=value, e.g. optim.lr=3e-4")
        out[key.strip()] = parse_value(value)
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    check_key(key, source)
    node = raw
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python values (safe_load: a file's tags construct no objects); a syntax error is one line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's values ({} for an empty file); a missing, unreadable or non-UTF-8 file is one line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: job file not found" if not p.exists() else f"{p}: not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    return parse_yaml(text, str(p)) or {}


def load_job(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> JobConfig:
    """Read a job file (or the defaults when ``path`` is None), apply overrides, validate once. A job without
    run.name is named after its file."""
    raw = read_yaml(path) if path else {}
    cfg = JobConfig.from_raw(raw, str(path) if path else "defaults", overrides)
    if cfg.run.name is None and path:
        cfg.run.name = Path(path).stem
    return cfg
