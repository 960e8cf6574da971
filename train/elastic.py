"""Elastic resume: a checkpoint written by another world size (or another expert layout) re-placed by tree node.

DeepSpeed's loader maps per-expert files to slots by their global expert id, so it cannot load a checkpoint
whose levels have other padded slot counts, and with the same slot counts but another layout it would load
the wrong expert into a slot. Here nothing goes through it: weights.py reads every file with
`torch.load(weights_only=True)`, the dense weights load strictly by name, and every expert placed on this
rank loads from the file its node was saved in (the checkpoint's `slot_nodes` table). The optimizer keeps
the fresh (zero) state it was built with; ZeRO's fp32 master copies are refreshed from the loaded weights.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from unirestorer.parallel.tree_moe import TreeMoE
from unirestorer.train.checkpoint import CheckpointError, ResumePoint
from unirestorer.train.weights import (EXPERT_KEY_RE, SLOT_TABLE, expert_file_paths, expert_files_by_node,
                                       read_checkpoint, read_expert_file)


def _trees(module: nn.Module) -> list[tuple[str, TreeMoE]]:
    return [(f"{name}." if name else "", m) for name, m in module.named_modules() if isinstance(m, TreeMoE)]


def layout_matches(module: nn.Module, point: ResumePoint) -> bool:
    """Whether every TreeMoE of `module` has the slot table the checkpoint was saved with (reads only the dense file)."""
    trees = _trees(module)
    if not trees:
        return True
    dense = read_checkpoint(point.path, experts=False).dense
    return all(torch.equal(dense.get(prefix + SLOT_TABLE, torch.empty(0)), tree.slot_nodes.cpu())
               for prefix, tree in trees)


def load_replaced(engine: Any, point: ResumePoint, rank: int, world: int) -> dict[str, Any]:
    """Collective-free: this rank's weights from checkpoint `point`, experts re-placed by tree node; returns the
    client state. Prints the one line that says what happened (rank 0)."""
    ckpt = read_checkpoint(point.path, experts=False)  # each rank reads only the expert files it places
    on_disk = expert_file_paths(ckpt.path)
    module: nn.Module = engine.module
    trees = _trees(module)
    # the TreeMoE's own entries (slot table, DeepSpeed's unused gate sized by the slot count) follow the layout
    layout = tuple(f"{p}{name}" for p, _ in trees for name in (SLOT_TABLE, "levels."))
    dense_own = {k for k in module.state_dict() if not EXPERT_KEY_RE.match(k) and not k.startswith(layout)}
    saved = {k for k in ckpt.dense if not k.startswith(layout)}
    if dense_own != saved:
        raise CheckpointError(f"{ckpt.path}: its weights do not fit this model: missing {sorted(dense_own - saved)[:8]}, "
                              f"unexpected {sorted(saved - dense_own)[:8]}")
    try:
        module.load_state_dict({k: ckpt.dense[k] for k in dense_own}, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.path}: its weights do not fit this model: {err}") from None
    layer_of = {id(m): i for i, m in enumerate(m for m in module.modules() if isinstance(m, MoE))}
    moved, layouts = 0, []
    for prefix, tree in trees:
        base = layer_of[id(tree.levels[0])]
        files = expert_files_by_node(ckpt, [lv.num_nodes for lv in tree.placement.levels], prefix, base, on_disk)
        for node in tree.local_nodes():
            weights, _ = read_expert_file(on_disk[files[node]], files[node])
            try:
                tree.local_module(node).load_state_dict(weights)
            except RuntimeError as err:
                raise CheckpointError(f"{ckpt.path}: the expert file of tree node {node} does not fit: {err}") from None
        moved += tree.placement.num_nodes
        before = [sum(1 for layer, _ in on_disk if layer == base + lv.level) for lv in tree.placement.levels]
        layouts.append(f"{before} -> {[lv.num_slots for lv in tree.placement.levels]}")
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:  # ZeRO / bf16 master copies: take the loaded weights there too
        refresh()
    if rank == 0:
        experts = (f"; {moved} experts re-placed by tree node from their files (slots per level "
                   f"{', '.join(layouts)})" if trees else "")
        print(f"[checkpoint] elastic resume: {point.path} was written by {point.world_size} ranks, this run has "
              f"{world}: loading weights only; optimizer, LR schedule state and RNG start fresh (optimizer state "
              f"reset){experts}", file=sys.stderr, flush=True)
    return ckpt.client_state
