"""Read a training checkpoint without DeepSpeed, on one process, at any world size.

DeepSpeed's files in a checkpoint folder (see train/checkpoint.py for our layout around them):

    mp_rank_00_model_states.pt                      {"module": dense state dict (no expert params),
                                                     our client state keys ("step", "config", ...), ...}
    layer_{L}_expert_{E}_mp_rank_00_model_states.pt one per (MoE layer L, global expert id E): that
                                                     expert's params under their full module path
    zero_pp_rank_*_optim_states.pt                  optimizer shards (not read here)

Expert file `layer_L_expert_E` holds whatever tree node slot E of level L held in the run that wrote it:
the TreeMoE's `slot_nodes` buffer in the dense state says which (`expert_files_by_node`).

Everything is loaded with `torch.load(weights_only=True)`: DeepSpeed 0.19.8 writes only tensors, plain
containers, str/int/float/None into these files (its "ds_config" and "param_shapes" included), so no
allowlist is needed; a file that needs one fails with an error naming it instead of being unpickled.
Only mp_rank_00 exists in our runs (no tensor/model parallelism).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import torch
from torch import nn

from unirestorer.train.checkpoint import LATEST, MARKER, CheckpointError, read_latest, read_marker

DENSE_FILE = "mp_rank_00_model_states.pt"
EXPERT_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
EXPERT_KEY_RE = re.compile(r"^(.*\.deepspeed_experts\.(\d+)\.)(.+)$")
# keys of mp_rank_00_model_states.pt that DeepSpeed itself writes; everything else is our client state
DS_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
    "ds_version", "checkpoint_parallel_dimensions", "num_experts", "ds_autoep_layers", "universal_checkpoint_info",
})


@dataclass
class Checkpoint:
    path: Path  # the step folder that was read
    dense: dict[str, torch.Tensor]  # engine.module.state_dict() minus expert params
    experts: dict[tuple[int, int], dict[str, torch.Tensor]]  # (MoE layer, global expert id) -> expert's own keys
    expert_prefix: dict[tuple[int, int], str]  # the module path the expert's keys were stored under
    client_state: dict[str, Any]  # what the spine passed as client_state ("step", "config", "stage", ...)
    step: int
    ds_meta: dict[str, Any] = field(default_factory=dict)  # DeepSpeed's own scalars (dp_world_size, ds_version...)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except Exception as e:  # unpickling refused / truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint file {path} with torch.load(weights_only=True): "
                              f"{type(e).__name__}: {str(e)[:500]}") from None


def step_dir(path: str | Path) -> Path:
    """A checkpoint root (follows its `latest` pointer) or a step folder -> the step folder."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a folder")
    if not (p / DENSE_FILE).is_file() and (p / LATEST).is_file():
        p = read_latest(p, f"checkpoint {p}")  # a step tag inside p, never a path elsewhere
    if not (p / DENSE_FILE).is_file():
        raise CheckpointError(f"{p} holds no {DENSE_FILE}: not a DeepSpeed checkpoint folder nor a folder "
                              f"with a '{LATEST}' file naming one")
    if (p.parent / LATEST).is_file() and not (p / MARKER).is_file():
        raise CheckpointError(f"checkpoint {p} has no {MARKER}: its save did not finish")
    if (p / MARKER).exists():
        read_marker(p, f"checkpoint {p}")
    return p


def read_checkpoint(path: str | Path, experts: bool = True) -> Checkpoint:
    """Dense weights, per-expert weights and client state of one checkpoint, on CPU, no DeepSpeed."""
    p = step_dir(path)
    if any(p.glob("mp_rank_01_*")):
        raise CheckpointError(f"{p}: written with model parallelism (mp_rank_01 files); not supported")
    raw = _load(p / DENSE_FILE)
    if not isinstance(raw, dict) or not isinstance(raw.get("module"), dict):
        raise CheckpointError(f"{p / DENSE_FILE}: no 'module' state dict in it")
    client = {k: v for k, v in raw.items() if k not in DS_KEYS}
    meta = {k: v for k, v in raw.items() if k in DS_KEYS and k != "module" and isinstance(v, (int, str, float))}
    found: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    prefixes: dict[tuple[int, int], str] = {}
    for key, f in expert_file_paths(p).items() if experts else []:
        found[key], prefixes[key] = read_expert_file(f, key)
    step = int(client.get("step", raw.get("global_steps", -1)))
    return Checkpoint(p, dict(raw["module"]), found, prefixes, client, step, meta)


def expert_file_paths(step: Path) -> dict[tuple[int, int], Path]:
    """(MoE layer, global expert id) -> its per-expert file in step folder `step`."""
    return {(int(m[1]), int(m[2])): f for f in sorted(step.iterdir()) if (m := EXPERT_RE.match(f.name))}


def read_expert_file(f: Path, key: tuple[int, int]) -> tuple[dict[str, torch.Tensor], str]:
    """One per-expert file: the expert's own keys (module path stripped) and the path they were stored under."""
    local, prefix = {}, None
    for name, tensor in _load(f).items():
        km = EXPERT_KEY_RE.match(name)
        if km is None or int(km[2]) != key[1] or prefix not in (None, km[1]):
            raise CheckpointError(f"{f}: key {name!r} is not a parameter of expert {key[1]}")
        prefix, local[km[3]] = km[1], tensor
    return local, prefix or ""


def load_submodule(module: nn.Module, dense: dict[str, torch.Tensor], prefix: str, strict: bool = True) -> None:
    """Load `module` from the entries of `dense` under `prefix` (e.g. "extractor." out of a later stage)."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    sub = {k[len(prefix):]: v for k, v in dense.items() if k.startswith(prefix)}
    if not sub:
        heads = sorted({k.split(".")[0] for k in dense})
        raise CheckpointError(f"no weights under prefix {prefix!r}; top-level names in the checkpoint: {heads}")
    missing, unexpected = module.load_state_dict(sub, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"weights under {prefix!r} do not fit {type(module).__name__}: "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")


SLOT_TABLE = "slot_nodes"  # TreeMoE's buffer: node id per (level, slot), -1 idle


def expert_files_by_node(ckpt: Checkpoint, level_sizes: Sequence[int], prefix: str = "tree_moe.",
                         layer_offset: int = 0, available: Collection[tuple[int, int]] | None = None
                         ) -> dict[int, tuple[int, int]]:
    """Tree node -> (MoE layer, slot) of its per-expert file in `ckpt`, for the TreeMoE stored under `prefix`.

    Read from the TreeMoE's saved slot table; a checkpoint without one (written before it existed) is in
    node order. Every node must have its file among `available` (default: the experts read into `ckpt`),
    or the error names the ones that do not.
    """
    available = ckpt.experts if available is None else available
    table = ckpt.dense.get(prefix + SLOT_TABLE)
    files: dict[int, tuple[int, int]] = {}
    if table is None:
        first = 0
        for level, size in enumerate(level_sizes):
            files.update({first + s: (layer_offset + level, s) for s in range(size)})
            first += size
    else:
        if table.dim() != 2 or table.shape[0] != len(level_sizes):
            raise CheckpointError(f"{ckpt.path}: {prefix + SLOT_TABLE} has shape {tuple(table.shape)}, the tree has "
                                  f"{len(level_sizes)} levels: not a checkpoint of this tree")
        for level, row in enumerate(table.tolist()):
            files.update({int(node): (layer_offset + level, slot) for slot, node in enumerate(row) if node >= 0})
    missing = [n for n in range(sum(level_sizes)) if files.get(n) not in available]
    if missing:
        raise CheckpointError(f"{ckpt.path}: no per-expert file for tree node(s) {missing} (wanted "
                              f"{['layer_%d_expert_%d' % files[n] if n in files else 'none' for n in missing][:8]}): "
                              f"not a checkpoint of this tree")
    return files
