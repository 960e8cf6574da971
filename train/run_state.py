"""Per-rank run state that DeepSpeed does not save: RNG states and the data-stream position.

Everything captured here is made of tensors, str, int, float, bool, None, lists and dicts, so it
round-trips through `torch.save` / `torch.load(..., weights_only=True)` (no numpy objects, no
pickled classes). numpy states become JSON strings: numpy's arrays and 128-bit PCG64 integers
have no weights_only-safe form otherwise.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch

Generator = torch.Generator | np.random.Generator


def _np_to_json(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {k: _np_to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_np_to_json(v) for v in obj]
    return obj


def _np_from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _np_from_json(v) for k, v in obj.items()}
    return obj


def capture_rng(generators: Mapping[str, Generator] | None = None) -> dict[str, Any]:
    """RNG states of this process: python `random`, numpy global, torch CPU, torch CUDA (if in use),
    and each named torch.Generator / np.random.Generator (e.g. the data sampler's)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": json.dumps(_np_to_json(np.random.get_state(legacy=False))),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        if isinstance(gen, torch.Generator):
            state["generators"][name] = {"kind": "torch", "state": gen.get_state()}
        elif isinstance(gen, np.random.Generator):
            state["generators"][name] = {"kind": "numpy", "state": json.dumps(_np_to_json(gen.bit_generator.state))}
        else:
            raise TypeError(f"generator {name!r}: expected torch.Generator or np.random.Generator, got {type(gen)}")
    return state


def restore_rng(state: dict[str, Any], generators: Mapping[str, Generator] | None = None) -> None:
    """Inverse of `capture_rng`. Every generator passed must have a saved state (a missing one
    would silently break exact resume)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    np_state = _np_from_json(json.loads(state["numpy"]))
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["generators"]
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"no saved RNG state for generator {name!r}; saved: {sorted(saved)}")
        if isinstance(gen, torch.Generator):
            gen.set_state(saved[name]["state"])
        else:
            gen.bit_generator.state = _np_from_json(json.loads(saved[name]["state"]))


@dataclass
class DataPosition:
    """Where a rank's data stream stands. Webdataset keeps no resume state, so a stream is rebuilt
    from (seed, rank, restarts) and fast-forwarded by `batches` when exact replay is wanted."""

    seed: int
    restarts: int = 0  # times this stream was rebuilt after a resume
    batches: int = 0  # batches consumed since the stream was (re)built

    def stream_seed(self, rank: int) -> int:
        """Seed of the shard/sample shuffling for this rank and restart: different on every rank
        and after every restart, reproducible from the record."""
        return int(np.random.SeedSequence([self.seed, rank, self.restarts]).generate_state(1)[0])

    def restarted(self) -> DataPosition:
        return DataPosition(self.seed, self.restarts + 1, 0)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        return cls(int(d["seed"]), int(d["restarts"]), int(d["batches"]))


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch differently per rank (same model init needs an explicit broadcast
    or seeding before the per-rank call)."""
    s = seed + 1_000_003 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
