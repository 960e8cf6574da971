"""Typed run configuration: dataclasses loaded from TOML/YAML, `key.sub=value` overrides, CLI flags.

One `RunConfig` describes a run of any stage. It is printed in full at start and stored with every
checkpoint (`to_dict`), so a checkpoint says exactly how it was made. Values are checked against the
field types when loaded, so a typo fails at start with the list of valid keys, not hours later.
The DeepSpeed part lives in `ds_config.json`; `build_ds_config` merges the `[deepspeed]` section into it.
ds_config.json has no "optimizer"/"scheduler": each stage builds torch.optim.AdamW with its own param
groups (per-level / per-expert LR, MoE groups) and passes it as `optimizer=` to deepspeed.initialize,
which also avoids compiling DeepSpeed's CPU Adam op.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

REPO_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_config.json"


class ConfigError(ValueError):
    """A config file, override or flag that does not fit the schema."""


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)  # brace patterns / paths of .tar shards
    val_shards: list[str] = field(default_factory=list)
    family_weights: list[float] = field(default_factory=list)  # one per degradation family; [] = equal
    patch_size: int = 128
    num_workers: int = 6  # per rank; launch/slurm.sbatch reserves 8 CPUs per task (main + 6 workers + spare)
    shuffle_buffer: int = 1000
    batches_per_epoch: int = 1000  # per rank: equal step counts on every rank (webdataset with_epoch)
    balance: bool = True  # experts: mix single-task shard sets so every leaf gets data (see stage_experts)
    online: bool = False  # training streams re-degrade each stored gt with fresh parameters of its own task


@dataclass
class ModelConfig:
    arch: str = "restormer"
    preset: str = ""  # experts: create_expert preset ("tiny", "small", "paper"); "" = restormer from dim/blocks/heads
    dim: int = 48
    num_blocks: list[int] = field(default_factory=lambda: [4, 6, 6, 8])
    heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    ffn_expansion: float = 2.66
    # experts: 0 = a full expert per node; r > 0 = the paper's LoRA tree: the root a full expert, frozen once its
    # level ends, every other node the root's weights + a rank-r LoRA on every conv (the experts stage needs
    # train.init_from_parent and train.level_end_steps[0] <= train.level_start_steps[1])
    lora_rank: int = 0
    lora_alpha: float = 16.0  # LoRA scale alpha / lora_rank (paper: rank 8, alpha 16)
    extractor_backbone: str = "resnet10t"  # any timm model name
    embed_dim: int = 256
    extractor_proj_dim: int = 128  # contrastive projection
    extractor_crop: int = 64  # native-resolution crop size the extractor trains and embeds at (no resizing)
    extractor_max_crops: int = 16  # `embed` averages a grid of about one crop per crop area, at most this many


@dataclass
class TreeConfig:
    # nodes per level, root first; [] = [1, T, 2T] for the T tasks in the embedded samples (type, type + degree)
    levels: list[int] = field(default_factory=list)
    num_samples: int = 4096  # shard samples embedded to build the tree
    # with one level-1 node per task: start level 1's k-means from the per-task mean embeddings (model/tree.py)
    level1_from_tasks: bool = True
    ep_sizes: list[int] = field(default_factory=list)  # ranks each level's experts spread over; [] = auto
    path: str = ""  # tree folder (tree.json + tree.safetensors + tree_stats.json) written by `cluster`


@dataclass
class TrainConfig:
    stage: str = "experts"
    max_steps: int = 1000
    seed: int = 0
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "cosine"
    loss: str = "l1"
    max_bad_steps: int = 10  # consecutive NaN/Inf losses before the run stops
    init_from_parent: bool = True
    dg_weight: float = 0.1  # router: weight of L_dg
    aux_weight: float = 0.01  # router: weight of L_aux
    # router supervision from the frozen experts' measured errors (0 = the paper's loss alone): CE towards the
    # image's tree leaf, and towards the coarsest level whose expert on that path comes within level_margin_db of
    # the best
    leaf_ce_weight: float = 1.0
    level_ce_weight: float = 1.0
    level_margin_db: float = 0.0  # router: the level target is the coarsest within this many dB of the best
    init_ckpt: str | None = None  # weights of an earlier stage
    level_lrs: list[float] = field(default_factory=list)  # experts: peak LR per tree level; [] = lr everywhere
    # experts: step each level starts, from its trained parent; [] = level l at l * max_steps / n_levels
    level_start_steps: list[int] = field(default_factory=list)
    # experts: step each level stops training (its LR schedule ends there, images stop going to it); [] = max_steps
    level_end_steps: list[int] = field(default_factory=list)
    # experts: the last N of max_steps train the root alone once more, at a 60 dB loss floor, after every other
    # level has ended: the fallback learns to leave near-clean images alone without changing what its children
    # copied (0 = off; needs train.loss = "psnr" and a full, non-LoRA root)
    root_polish_steps: int = 0
    # test hook: 1-based steps whose loss the spine replaces by NaN on the last rank (see train/stage.py)
    debug_nan_steps: list[int] = field(default_factory=list)
    channels_last: bool = False  # experts stage: experts and their images in channels_last (faster bf16 convs on CUDA)
    compile_experts: bool = False  # experts stage: torch.compile every local expert (the first steps compile)
    debug_step_sleep: float = 0.0  # test hook: seconds each rank sleeps after every step (to kill a run mid-way)
    # global batch that lr and the step counts are written for; 0 = use them as written (train/scaling.py)
    reference_batch: int = 0
    lr_scaling: str = "sqrt"  # with reference_batch: lr × sqrt(global / reference), "linear" or "none"


@dataclass
class DeepSpeedOverrides:
    """Values that replace the ones in `config` (ds_config.json); None keeps the file's value."""

    config: str = str(REPO_DS_CONFIG)
    micro_batch: int | None = None
    grad_accum: int | None = None
    grad_clip: float | None = None
    zero_stage: int | None = None
    bf16: bool | None = None  # None: the file's value; "auto" there means on for CUDA, off on CPU


@dataclass
class LogConfig:
    dir: str = "runs"
    every: int = 10  # steps between JSON log lines / TensorBoard scalars
    val_every: int = 500
    val_batches: int = 8  # per rank, from data.val_shards


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every: int = 500
    keep_last: int = 2
    resume: str = "auto"  # auto | none | PATH
    force: bool = False  # start fresh even though `dir` holds another run's checkpoints (moved aside first)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedOverrides = field(default_factory=DeepSpeedOverrides)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def pretty(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------- type conversion


def _parse_scalar(text: str, typ: type, key: str) -> Any:
    text = text.strip()
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a bool (true/false), got {text!r}")
    if typ in (int, float):
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {text!r}") from None
    return text


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert `value` (a string from the command line, or a TOML/YAML value) to the field type."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):  # Optional[T]
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return _coerce(value, inner, key)
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                text = text[1:-1] if text.endswith("]") else text[1:]
            value = [v for v in (p.strip().strip("'\"") for p in text.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        return _parse_scalar(value, typ, key)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _fields(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _set(cfg: RunConfig, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    sections = _fields(cfg)
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} in {key!r}; valid sections: {', '.join(sections)}")
    sub = getattr(cfg, section)
    names = _fields(sub)
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}; valid keys in [{section}]: {', '.join(names)}")
    setattr(sub, name, _coerce(value, names[name], key))


# ---------------------------------------------------------------- loading


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Build a RunConfig from nested `{section: {key: value}}`; unknown keys are errors."""
    cfg = RunConfig()
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, got {values!r}")
        for name, value in values.items():
            try:
                _set(cfg, f"{section}.{name}", value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults ← file (.toml, .yaml/.yml) ← `section.key=value` overrides, in that order."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            if path.suffix == ".toml":
                raw = tomllib.loads(path.read_text())
            elif path.suffix in (".yaml", ".yml"):
                raw = yaml.safe_load(path.read_text()) or {}
            else:
                raise ConfigError(f"config file {path}: unknown format {path.suffix!r} (use .toml, .yaml or .yml)")
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
    cfg = from_dict(raw, str(path) if path else "<defaults>")
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set(cfg, key.strip(), value)
    return cfg


# ---------------------------------------------------------------- command line

# flag dest -> config key; a flag given on the command line wins over file and key=value overrides.
FLAG_KEYS = {
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "ckpt_dir": "ckpt.dir",
    "ckpt_every": "ckpt.every",
    "resume": "ckpt.resume",
    "log_dir": "log.dir",
    "force": "ckpt.force",
}


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every stage takes. `--local_rank` is accepted because the deepspeed launcher passes it
    (our launch scripts use --no_local_rank; ranks always come from the environment)."""
    parser.add_argument("--config", type=Path, default=None, help="TOML or YAML config file")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints")
    parser.add_argument("--resume", default=None, help="auto (newest complete checkpoint, else fresh) | PATH | none")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--force", action="store_true", default=None,
                        help="start fresh although --ckpt-dir holds another run's checkpoints (they are moved aside)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config, args.overrides)
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is not None:
            _set(cfg, key, value)
    return cfg


# ---------------------------------------------------------------- DeepSpeed config


def build_ds_config(cfg: RunConfig, device_type: str) -> dict[str, Any]:
    """ds_config.json with the `[deepspeed]` overrides applied and bf16 "auto" decided.

    bf16 "auto" and zero_optimization.overlap_comm "auto" are on for CUDA and off elsewhere (CPU runs are
    for tests and demos).
    """
    path = Path(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed config {path}: {e}") from None
    o = cfg.deepspeed
    if o.micro_batch is not None:
        ds["train_micro_batch_size_per_gpu"] = o.micro_batch
    if o.grad_accum is not None:
        ds["gradient_accumulation_steps"] = o.grad_accum
    if o.grad_clip is not None:
        ds["gradient_clipping"] = o.grad_clip
    if o.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = o.zero_stage
    bf16 = ds.setdefault("bf16", {})
    if o.bf16 is not None:
        bf16["enabled"] = o.bf16
    elif bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = device_type == "cuda"
    zero = ds.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":  # gradient reduction on its own CUDA stream, overlapping backward
        zero["overlap_comm"] = device_type == "cuda"
    if "gradient_clipping" not in ds:
        raise ConfigError(f"deepspeed config {path}: set gradient_clipping explicitly (DeepSpeed defaults to 1.0)")
    if ds.get("zero_optimization", {}).get("stage", 0) > 2:
        raise ConfigError(f"deepspeed config {path}: ZeRO stage 3 cannot be used with MoE layers; use 1 or 2")
    return ds
