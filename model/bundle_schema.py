"""What a weights bundle may contain, checked before any of it reaches a constructor or a tensor copy.

bundle.json is user-supplied data: its kwargs would otherwise go straight into timm and the model
constructors (an `hf-hub:` backbone makes timm reach for the network; an unknown key is a TypeError
traceback). The schema: the top-level keys below; for the extractor, the router and each expert, the
keyword parameters of the constructor that rebuilds it (names, annotated types, required ones), with
plain JSON values of bounded size, and a backbone that is a timm model name known locally. Free-form
content is accepted only where named (`FREE_FORM`), and the extractor's optional `families` list.
An expert of a LoRA tree also has `"lora": {"rank": int >= 1, "alpha": float > 0, "base": node}`, its base a
plain expert (no `lora`) of the same spec whose weights it is rebuilt on. An optional `calibration` object
(`samples`, `k`, `harm_share`, `min_members`, the `shards` it was measured on, `floor_quantile` where it keeps
the samples' dark channel floors and `ceiling_quantile` where it keeps their brightness ceilings) names the bank in
calibration.safetensors (model/calibration.py), whose tensors are checked as the weights are.

Sizes are bounded before anything is built: integers in [1, 65536] (fields named `*blocks` may be 0,
and `*blocks`, `*heads`, `*crops` are at most 64), at most 1024 tree nodes, bundle.json at most 16 MiB
and 64 deep (unirestorer/safe_json.py). The modules are then built on PyTorch's meta device (no memory),
so the bytes the model needs are known before any is allocated and are refused above the machine's
memory; a field that makes a constructor fail is one line too.

weights.safetensors must hold exactly the tensors the rebuilt modules expect, with their shapes and
dtypes, all finite: a missing, extra, misshapen, mistyped or NaN/Inf tensor is refused with one line
naming it. The router's tree lookups must be the tree's own (leaf paths), and every task must allow a
leaf and the root, or instruction mode would have nothing to pick.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

BUNDLE_FORMAT = "unirestorer-bundle/1"
REQUIRED = ("format", "extractor", "router", "experts", "tree")
FREE_FORM = ("source", "training_config")  # provenance written by export; never passed to a constructor
OPTIONAL = ("calibration",)  # written by `unirestorer calibrate` (its tensors: calibration.safetensors)
CALIBRATION_KEYS = {"samples": int, "k": int, "harm_share": float, "min_members": int, "shards": list[str],
                    "floor_quantile": float, "ceiling_quantile": float}
EXTRACTOR_EXTRAS = {"families": list[str]}  # optional keys the extractor config may carry beyond its kwargs
TREE_KEYS = {"level_sizes": list[int], "parents": list[int], "counts": list[int], "task_names": list[str],
             "task_counts": list[list[int]], "radii": list[float],
             "intensity_ranges": list[list[tuple[float, float] | None]]}  # [node][task]: [min, max] or null
TREE_OPTIONAL = ("radii", "intensity_ranges")  # trees written before them have neither
LORA_KEYS = {"rank": int, "alpha": float, "base": int}
MAX_INT = 1 << 16  # a width or size beyond this is not a model this project builds
MAX_COUNT = 64  # blocks, heads, crops per entry
COUNTS = re.compile(r"blocks|heads|crops")
MAX_LIST = 1 << 16
MAX_NODES = 1024


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file and the field."""


def _type_ok(value: Any, typ: Any) -> bool:
    """Is the JSON value `value` an instance of the annotation `typ` (bounded ints, lists, strings)?"""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is Any or typ is inspect.Parameter.empty:
        return isinstance(value, (int, float, str, bool)) or value is None
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if typ is type(None):
        return value is None
    if origin in (list, tuple, collections.abc.Sequence) or typ in (list, tuple):
        if not isinstance(value, list) or len(value) > MAX_LIST:
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return all(_type_ok(v, args[0] if args else Any) for v in value)
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT
    if typ is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and abs(value) <= MAX_INT)
    if typ is str:
        return isinstance(value, str) and len(value) <= 256
    return False


def constructor_fields(build: Callable[..., Any]) -> tuple[dict[str, Any], list[str]]:
    """Keyword parameters of `build` (a class or function) -> ({name: annotation}, required names)."""
    target = build.__init__ if inspect.isclass(build) else build
    hints = typing.get_type_hints(target)
    params = {n: p for n, p in inspect.signature(build).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "in_chans")}
    return {n: hints.get(n, p.annotation) for n, p in params.items()}, [
        n for n, p in params.items() if p.default is p.empty]


def check_fields(obj: Any, allowed: Mapping[str, Any], required: list[str], where: str) -> None:
    """`obj` must be a JSON object with only `allowed` keys, all `required` ones, each of its type."""
    if not isinstance(obj, dict):
        raise BundleError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise BundleError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    missing = [n for n in required if n not in obj]
    if missing:
        raise BundleError(f"{where}: required key {missing[0]!r} is missing")
    for name, value in obj.items():
        if not _type_ok(value, allowed[name]):
            shown = str(allowed[name]).replace("typing.", "") if typing.get_args(allowed[name]) else getattr(
                allowed[name], "__name__", str(allowed[name]))
            raise BundleError(f"{where}.{name}: {json.dumps(value)[:80]} is not a valid {shown}")


def check_range(name: str, value: Any, where: str) -> None:
    """Integers (alone or in lists) in [1, MAX_INT]; fields named like counts in [0 or 1, MAX_COUNT]."""
    count = COUNTS.search(name) is not None
    low, high = (0 if "blocks" in name else 1), (MAX_COUNT if count else MAX_INT)
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, int) and not isinstance(v, bool) and not low <= v <= high:
            raise BundleError(f"{where}.{name}: {v} is outside {low}..{high}")


def check_kwargs(kwargs: Any, build: Callable[..., Any], where: str, extras: Mapping[str, Any] = {}) -> None:
    """`kwargs` must be a JSON object of `build`'s keyword parameters (plus `extras`), of their types."""
    allowed, required = constructor_fields(build)
    check_fields(kwargs, allowed | dict(extras), required, where)
    for name, value in kwargs.items():
        check_range(name, value, where)


def check_backbone(name: str, where: str) -> None:
    """A timm architecture name of this install: no `hf-hub:` / `timm/` / URL / pretrained tag lookups."""
    import timm

    if ":" in name or "/" in name or not timm.is_model(name):
        raise BundleError(f"{where}: {name!r} is not a timm architecture name known to this install "
                          f"(hub, URL and pretrained-tag names are refused: a bundle never downloads)")


def check_config(config: Any, source: str, build_extractor: Callable[..., Any] | None = None) -> None:
    """Raise BundleError (one line naming `source` and the field) unless `config` fits the schema;
    the extractor's keys are those of `build_extractor` (default: DegradationExtractor)."""
    from .experts import ARCHITECTURES, EXPERTS
    from .extractor import DegradationExtractor
    from .router import Router

    if not isinstance(config, dict):
        raise BundleError(f"{source}: expected a JSON object at the top level")
    unknown = sorted(set(config) - set(REQUIRED) - set(FREE_FORM) - set(OPTIONAL))
    if unknown:
        allowed = ", ".join(REQUIRED + FREE_FORM + OPTIONAL)
        raise BundleError(f"{source}: unknown key {unknown[0]!r}; allowed: {allowed}")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise BundleError(f"{source}: required key {missing[0]!r} is missing")
    if config["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{source}: format {config['format']!r}, expected {BUNDLE_FORMAT!r}")
    for key in FREE_FORM:
        if key in config and not isinstance(config[key], dict):
            raise BundleError(f"{source}: {key} must be an object")
    check_kwargs(config["extractor"], build_extractor or DegradationExtractor, f"{source}: extractor", EXTRACTOR_EXTRAS)
    if "backbone" in config["extractor"]:
        check_backbone(config["extractor"]["backbone"], f"{source}: extractor.backbone")
    check_kwargs(config["router"], Router, f"{source}: router")
    tree = config["tree"]
    check_fields(tree, TREE_KEYS, [k for k in TREE_KEYS if k not in TREE_OPTIONAL], f"{source}: tree")
    n_nodes = sum(tree["level_sizes"])
    if n_nodes > MAX_NODES or n_nodes != len(tree["parents"]):
        raise BundleError(f"{source}: tree.level_sizes sum to {n_nodes} nodes; expected one parent each "
                          f"({len(tree['parents'])} given) and at most {MAX_NODES}")
    if "calibration" in config:
        cal = config["calibration"]
        check_fields(cal, CALIBRATION_KEYS, ["samples", "k", "harm_share", "min_members"], f"{source}: calibration")
        if cal["samples"] < 1 or cal["k"] < 1 or cal["min_members"] < 1 or not 0 <= cal["harm_share"] <= 1:
            raise BundleError(f"{source}: calibration: samples, k and min_members must be >= 1 and harm_share in "
                              f"[0, 1], got {json.dumps(cal)[:160]}")
    experts = config["experts"]
    if not isinstance(experts, dict) or sorted(experts) != sorted(str(n) for n in range(n_nodes)):
        got = sorted(experts)[:8] if isinstance(experts, dict) else type(experts).__name__
        raise BundleError(f"{source}: experts must have one entry per tree node '0'..'{n_nodes - 1}', got {got}")
    for node, spec in experts.items():
        where = f"{source}: experts.{node}"
        if not isinstance(spec, dict):
            raise BundleError(f"{where}: expected an object, got {type(spec).__name__}")
        name, preset = spec.get("name"), spec.get("preset", "tiny")
        if name not in ARCHITECTURES:
            raise BundleError(f"{where}.name: {name!r} is not one of {sorted(ARCHITECTURES)}")
        if preset not in EXPERTS[name]:
            raise BundleError(f"{where}.preset: {preset!r} is not one of {sorted(EXPERTS[name])}")
        overrides = {k: v for k, v in spec.items() if k not in ("name", "preset", "lora")}
        check_kwargs(overrides, ARCHITECTURES[name], where)
        if "lora" in spec:
            check_lora(spec, node, experts, f"{where}.lora")


def check_lora(spec: dict, node: str, experts: dict, where: str) -> None:
    """A LoRA expert's entry: rank >= 1, alpha > 0, and a base node that is plain and of the same spec."""
    lora = spec["lora"]
    check_fields(lora, LORA_KEYS, list(LORA_KEYS), where)
    if lora["rank"] < 1 or lora["alpha"] <= 0:
        raise BundleError(f"{where}: rank must be >= 1 and alpha > 0, got rank {lora['rank']}, alpha {lora['alpha']}")
    base = experts.get(str(lora["base"]))
    if str(lora["base"]) == node or not isinstance(base, dict) or "lora" in base:
        raise BundleError(f"{where}.base: {lora['base']} is not another tree node with a plain (non-LoRA) expert")
    if base != {k: v for k, v in spec.items() if k != "lora"}:
        raise BundleError(f"{where}.base: node {lora['base']}'s spec {json.dumps(base)[:120]} differs from this "
                          f"expert's: a LoRA expert is rebuilt on its base's weights, so they must match")


def read_config(path: Path, build_extractor: Callable[..., Any] | None = None) -> dict:
    """bundle.json, parsed (bounded size and depth) and checked."""
    from unirestorer.safe_json import JsonError, read_json

    try:
        config = read_json(path)
    except JsonError as err:
        raise BundleError(str(err)) from None
    check_config(config, str(path), build_extractor)
    return config


def build_on_meta(build: Callable[[], Any], source: str) -> Any:
    """`build()` on the meta device (shapes, no memory); a constructor's failure is a BundleError."""
    try:
        with torch.device("meta"):
            return build()
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError, AssertionError, IndexError, KeyError) as err:
        raise BundleError(f"{source}: the model it describes cannot be built ({type(err).__name__}: {err})") from None


def check_memory(state: Mapping[str, Tensor], source: str) -> None:
    """Refuse a model whose parameters and buffers need more bytes than this machine has."""
    need = sum(t.numel() * t.element_size() for t in state.values())
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise BundleError(f"{source}: the model needs {need / 2**30:.1f} GiB for its weights, more than this "
                          f"machine's {have / 2**30:.1f} GiB")


def check_routing(router: Any, tree: Any, source: str) -> None:
    """The router's lookups must be its tree's: leaf paths, and per task a leaf and the root allowed."""
    if not torch.equal(router.leaf_paths.cpu(), tree.leaf_paths()):
        raise BundleError(f"{source}: tensor 'router.leaf_paths' is not the tree's root-to-leaf paths")
    for t, name in enumerate(router.task_names):
        if not bool(router.task_leaf_mask[t].any()) or not bool(router.task_node_mask[t, 0]):
            raise BundleError(f"{source}: task {name!r}: its masks ('router.task_leaf_mask', "
                              f"'router.task_node_mask') allow no leaf or not the root")


def read_tensors(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BundleError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str) -> None:
    """Exactly the expected tensor names (`expected`: name -> a tensor of the shape and dtype wanted, meta
    ones do), with their shapes and dtypes, every floating value finite."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise BundleError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise BundleError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} not used by the model)")
    for name in sorted(expected):
        t = tensors[name]
        if tuple(t.shape) != tuple(expected[name].shape):
            raise BundleError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                              f"{tuple(expected[name].shape)}")
        if t.dtype != expected[name].dtype:
            raise BundleError(f"{source}: tensor {name!r} has dtype {t.dtype}, the model expects "
                              f"{expected[name].dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BundleError(f"{source}: tensor {name!r} holds NaN/Inf values; refusing a model that would "
                              f"restore garbage")
