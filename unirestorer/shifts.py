"""Shifted data for do-no-harm checks: clean, mild, heavy, camera noise, unseen mixtures and unseen families, and
their scores.

Used by `unirestorer demo` (its shift section) and bench/robustness.py. A set is built from clean images
and the degradation library only; image i is degraded with rng([seed, offset, i]), so a set is the same
on every machine. Scores come from `evaluate` per image, with the image's own classical floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

HARM_DB = 0.5  # routed below input by more than this = harm
MAX_PSNR = 50.0  # dB: identical images (a clean input vs its ground truth) score infinity; past 50 dB (the experts
# PSNR loss floor, LEVEL_PSNR_CAP) no difference is visible, so every PSNR is capped here and harm judged against it
COLUMNS = ("input", "classical", "root", "leaf", "router", "routed", "oracle")
FAMILY_ORDER = ("noise", "blur", "rain", "haze", "lowlight")
UNSEEN_MIXES = ("haze+noise", "lowlight+rain", "haze+blur", "rain+noise")
# per family: a label component of parameters below (mild) or above (heavy) the training range
MILD = {"noise": ("gaussian_noise", lambda r: {"sigma": round(float(r.uniform(2, 8)), 2)}),
        "blur": ("gaussian_blur", lambda r: {"sigma": round(float(r.uniform(0.3, 0.7)), 3)}),
        "rain": ("rain", lambda r: {"density": 0.0008, "length": 10.0, "angle": round(float(r.uniform(-15, 15)), 1),
                                    "brightness": 0.3}),
        "haze": ("haze", lambda r: {"beta": round(float(r.uniform(0.1, 0.35)), 3), "airlight": 0.85}),
        "lowlight": ("lowlight", lambda r: {"exposure": round(float(r.uniform(0.6, 0.85)), 3), "gamma": 1.0,
                                            "shot": 0.0003, "read": 0.002})}
HEAVY = {"noise": ("gaussian_noise", lambda r: {"sigma": round(float(r.uniform(55, 75)), 2)}),
         "blur": ("gaussian_blur", lambda r: {"sigma": round(float(r.uniform(4.5, 6.0)), 3)}),
         "rain": ("rain", lambda r: {"density": 0.015, "length": 40.0, "angle": round(float(r.uniform(-30, 30)), 1),
                                     "brightness": 0.95}),
         "haze": ("haze", lambda r: {"beta": round(float(r.uniform(2.3, 3.0)), 3), "airlight": 0.9}),
         "lowlight": ("lowlight", lambda r: {"exposure": round(float(r.uniform(0.02, 0.045)), 4), "gamma": 1.6,
                                             "shot": 0.01, "read": 0.02})}


@dataclass
class ShiftSet:
    name: str
    samples: list  # evaluate.Sample
    tasks: list[str | None]  # per image: the task whose classical method is its floor (None: the input)


def synthetic_set(name: str, pool: list, n: int, seed: int, offset: int,
                  degrade: Callable[[np.ndarray, int, np.random.Generator], tuple[np.ndarray, dict, str | None]]
                  ) -> ShiftSet:  # fmt: skip
    """n pool images from `offset` on, image i degraded by degrade(clean, i, rng([seed, offset, i]))."""
    from unirestorer.evaluate import Sample

    samples, tasks = [], []
    for i in range(n):
        stem, gt = pool[(offset + i) % len(pool)]
        lq, label, task = degrade(gt, i, np.random.default_rng([seed, offset, i]))
        samples.append(Sample(f"{name}_{i:02d}_{stem}", np.clip(lq, 0, 1).astype(np.float32), gt, label))
        tasks.append(task)
    return ShiftSet(name, samples, tasks)


def by_range(table: dict) -> Callable:
    """Image i gets family i mod 5 with parameters drawn from `table` (MILD or HEAVY)."""
    from unirestorer.data_shards.degradations import apply_label

    def degrade(gt: np.ndarray, i: int, rng: np.random.Generator) -> tuple[np.ndarray, dict, str]:
        family = FAMILY_ORDER[i % len(FAMILY_ORDER)]
        kind, params = table[family]
        label = {"task": family, "components": [{"family": family, "type": kind, "params": params(rng)}]}
        return apply_label(gt, label, rng), label, family
    return degrade


def camera(gt: np.ndarray, i: int, rng: np.random.Generator) -> tuple[np.ndarray, dict, str]:
    from unirestorer.data_shards.camera import camera_noise_eval, sample_camera_noise_eval

    params = sample_camera_noise_eval(rng)
    return camera_noise_eval(gt, params, rng), {"task": "noise", "camera_noise_eval": params}, "noise"


def unseen_mix(gt: np.ndarray, i: int, rng: np.random.Generator) -> tuple[np.ndarray, dict, None]:
    from unirestorer.data_shards.degradations import synthesize

    lq, label = synthesize(gt, UNSEEN_MIXES[i % len(UNSEEN_MIXES)], rng)
    return lq, label, None


def unseen_families(task_names: Sequence[str]) -> tuple[str, ...]:
    """The library's families that none of a bundle's training tasks holds ("mixed" holds them all)."""
    from unirestorer.data_shards.degradations import FAMILIES

    if "mixed" in task_names:
        return ()
    trained = {family for task in task_names for family in task.split("+")}
    return tuple(f for f in FAMILIES if f not in trained)


def unseen_family(families: Sequence[str]) -> Callable:
    """Image i gets family i mod len(families), at the library's own ranges: a degradation the bundle never saw
    at all (for the demo: JPEG and snow), the closest proxy for a real photo's unknown defect."""
    from unirestorer.data_shards.degradations import synthesize

    def degrade(gt: np.ndarray, i: int, rng: np.random.Generator) -> tuple[np.ndarray, dict, None]:
        lq, label = synthesize(gt, families[i % len(families)], rng)
        return lq, label, None
    return degrade


def identity(gt: np.ndarray, i: int, rng: np.random.Generator) -> tuple[np.ndarray, dict, None]:
    return gt.copy(), {"task": "clean", "intensity": 0.0, "components": []}, None


def run_set(model, shift: ShiftSet, denoiser: str, device: str) -> tuple[list[dict], list[np.ndarray]]:
    """evaluate() with each image's own classical floor, plus the router's own level's PSNR per record."""
    from unirestorer.evaluate import evaluate

    records, outputs = evaluate(model, shift.samples, device=device, progress=False, set_task=list(shift.tasks),
                                denoiser=denoiser)
    for r in records:
        for key in [k for k, v in r.items() if k.endswith("_psnr") and isinstance(v, float)]:  # identical: inf, capped
            r[key] = min(r[key], MAX_PSNR)
        r["path_psnr"] = [min(v, MAX_PSNR) for v in r["path_psnr"]]
        if r["classical_psnr"] is None:  # no classical method for this degradation: the floor is doing nothing
            r["classical_psnr"] = r["input_psnr"]
        r["router_psnr"] = r["path_psnr"][r["router_level"]]
    return records, outputs


def harm_cell(rate: float, n: int) -> str:
    """A harm rate with its count, for the tables: at 16 images one harmed image is 6.2 %, at 50 it is 2 %."""
    return f"{100 * rate:.1f} % ({round(rate * n)}/{n})"


def set_row(records: list[dict], n_levels: int) -> dict:
    """The table row of one set: mean PSNR per column, harm rate, routed-level counts."""
    row = {"n": len(records), **{c: float(np.mean([r[f"{c}_psnr"] for r in records])) for c in COLUMNS}}
    harm = [r["routed_psnr"] < r["input_psnr"] - HARM_DB for r in records]
    row["harm_rate"] = float(np.mean(harm))
    row["leaf_harm_rate"] = float(np.mean([r["leaf_psnr"] < r["input_psnr"] - HARM_DB for r in records]))
    row["worst"] = float(min(r["routed_psnr"] - r["input_psnr"] for r in records))
    row["levels"] = np.bincount([r["level"] for r in records], minlength=n_levels).tolist()
    return row


