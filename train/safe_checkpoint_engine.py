"""Resume without unpickling: DeepSpeed's checkpoint loads through torch.load(weights_only=True).

DeepSpeed's `engine.load_checkpoint` reads the model states, per-expert and ZeRO optimizer files with its
checkpoint engine's `load`, which for the default TorchCheckpointEngine is `torch.load(weights_only=False)`:
a planted `zero_pp_rank_*` file runs its code on every rank that resumes. `safe_loading(engine)` swaps in
an engine whose `load` uses the restricted unpickler, with an allowlist of exactly the non-tensor types
DeepSpeed 0.19.8 writes into these files (`torch.serialization.get_unsafe_globals_in_checkpoint` on a
ZeRO-2 optimizer file; the model states and per-expert files hold only tensors and plain values):

    deepspeed.utils.tensor_fragment.fragment_address    ZeRO optimizer: param_slice_mappings
    deepspeed.runtime.zero.config.ZeroStageEnum         ZeRO optimizer: zero_stage
    deepspeed.runtime.fp16.loss_scaler.LossScaler       ZeRO optimizer: loss_scaler (fp32 / bf16)
    deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler  the same with fp16 dynamic loss scaling

All of them are plain records (numbers, an enum); none runs code when rebuilt. Anything else in a file
is refused with a CheckpointError naming the file and the global it asked for.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from unirestorer.train.checkpoint import CheckpointError

_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+|Trying to [^.\n]+")


def allowed_globals() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load(weights_only=True) with DeepSpeed's record types allowed; CheckpointError otherwise."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except Exception as err:  # UnpicklingError for refused globals; EOFError, RuntimeError for damaged files
        found = _GLOBAL_RE.search(str(err))
        why = (f"it asks for {found[1]}, which is not an allowed type" if found and found[1]
               else found[0] if found else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        raise CheckpointError(f"refusing checkpoint file {path}: torch.load(weights_only=True) cannot read it "
                              f"({why}); it was not unpickled") from None


class SafeCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine: `load` is `safe_load`, everything else (save, commit) is its own."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def safe_loading(engine: Any) -> Iterator[None]:
    """While inside, `engine.load_checkpoint` reads every file with `safe_load`."""
    previous = engine.checkpoint_engine
    engine.checkpoint_engine = SafeCheckpointEngine(previous)
    try:
        yield
    finally:
        engine.checkpoint_engine = previous
