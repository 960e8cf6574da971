"""Which tree node lives on which rank: one DeepSpeed MoE layer per level, each with its own ep_size.

DeepSpeed needs `num_experts % ep_size == 0` and `world % ep_size == 0`, and its expert-parallel
groups are runs of consecutive ranks (rank r is position r % ep_size of its group), where position p
holds slots [p * local, (p + 1) * local). A level's nodes fill its slots in breadth-first order, so
checkpoint file `layer_L_expert_i` is always node i of level L; when k-means gives a count that does
not divide ep_size, the last slots are idle padding (a 1-element placeholder that is never routed to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LevelPlacement:
    """One granularity level: its nodes, its expert-parallel size and its padded slot count."""

    level: int
    first_node: int
    num_nodes: int
    ep_size: int
    num_slots: int

    @property
    def local_slots(self) -> int:
        return self.num_slots // self.ep_size

    @property
    def idle_slots(self) -> int:
        return self.num_slots - self.num_nodes

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for the expert-parallel / expert-data-parallel groups of this ep_size."""
        return f"ep_size_{self.ep_size}"

    def slots_on(self, ep_rank: int) -> range:
        return range(ep_rank * self.local_slots, (ep_rank + 1) * self.local_slots)

    def nodes_on(self, ep_rank: int) -> list[int]:
        """Global node ids held at expert-parallel position `ep_rank` (idle slots left out)."""
        return [self.first_node + s for s in self.slots_on(ep_rank) if s < self.num_nodes]


@dataclass(frozen=True)
class Placement:
    world_size: int
    levels: tuple[LevelPlacement, ...]

    @property
    def num_nodes(self) -> int:
        return sum(lv.num_nodes for lv in self.levels)

    def level_of_node(self) -> list[int]:
        return [lv.level for lv in self.levels for _ in range(lv.num_nodes)]

    def nodes_on_rank(self, rank: int) -> list[int]:
        return [n for lv in self.levels for n in lv.nodes_on(rank % lv.ep_size)]

    def expected_load(self, cluster_sizes: Sequence[float] | None = None) -> list[float]:
        """Expert forward passes per rank while experts train (k = levels), relative to plain DP (1.0).

        Every image visits one node per level; rank r serves the share of its expert-parallel group's
        images that fall in its nodes. `cluster_sizes[n]`: training images of node n (uniform if None).
        """
        sizes = list(cluster_sizes) if cluster_sizes is not None else [1.0] * self.num_nodes
        if len(sizes) != self.num_nodes:
            raise ValueError(f"cluster_sizes has {len(sizes)} entries, the tree has {self.num_nodes} nodes")
        loads = []
        for rank in range(self.world_size):
            share = 0.0
            for lv in self.levels:
                level_total = sum(sizes[lv.first_node: lv.first_node + lv.num_nodes]) or 1.0
                share += lv.ep_size * sum(sizes[n] for n in lv.nodes_on(rank % lv.ep_size)) / level_total
            loads.append(share / len(self.levels))
        return loads

    def report(self, params_per_node: Sequence[int], cluster_sizes: Sequence[float] | None = None) -> str:
        """Human-readable placement: nodes, parameters and expected load per rank, and what padding costs."""
        lines = [f"placement of {self.num_nodes} experts on {self.world_size} ranks "
                 f"(levels {[lv.num_nodes for lv in self.levels]}):"]
        for lv in self.levels:
            mode = ("replicated on every rank (data parallel)" if lv.ep_size == 1 else
                    f"{lv.local_slots} per rank, expert data parallel over {self.world_size // lv.ep_size} rank(s)")
            pad = f", {lv.idle_slots} idle padding slot(s)" if lv.idle_slots else ""
            lines.append(f"  level {lv.level}: {lv.num_nodes} experts, ep_size {lv.ep_size}, "
                         f"{lv.num_slots} slots, {mode}{pad}")
        loads = self.expected_load(cluster_sizes)
        for rank, load in enumerate(loads):
            nodes = self.nodes_on_rank(rank)
            params = sum(params_per_node[n] for n in nodes)
            idle = sum(1 for lv in self.levels for s in lv.slots_on(rank % lv.ep_size) if s >= lv.num_nodes)
            lines.append(f"  rank {rank}: nodes {nodes} (+{idle} idle), {params / 1e6:.3f}M params, "
                         f"expected load {load:.3f}x data parallel")
        idle_total = sum(lv.idle_slots for lv in self.levels)
        busiest = max(loads)
        lines.append(f"  padding: {idle_total} idle slot(s), 1 parameter each, never routed to; "
                     f"the busiest rank does {busiest:.3f}x the work of a balanced split "
                     f"(expected step-time cost {100 * (busiest - 1):.1f}% from placement"
                     f"{' and cluster sizes' if cluster_sizes is not None else ''})")
        return "\n".join(lines)


def choose_ep_size(num_nodes: int, world_size: int, max_padding_cost: float = 0.15) -> int:
    """Largest divisor of the world whose idle padding costs at most `max_padding_cost`.

    With ep_size d every position holds ceil(n / d) slots, so with even clusters the busiest rank
    does d * ceil(n / d) / n times the balanced work; d = 1 (replicated) always costs nothing.
    """
    return max(d for d in range(1, world_size + 1)
               if world_size % d == 0 and d * -(-num_nodes // d) <= (1 + max_padding_cost) * num_nodes)


def plan_placement(level_sizes: Sequence[int], world_size: int, ep_sizes: Sequence[int] | None = None,
                   max_padding_cost: float = 0.15) -> Placement:
    """Pick each level's ep_size (or take `ep_sizes`) and pad its slots to a multiple of it."""
    if world_size < 1 or not level_sizes or any(int(n) < 1 for n in level_sizes):
        raise ValueError(f"need world_size >= 1 and positive level sizes, got {world_size}, {list(level_sizes)}")
    if ep_sizes is not None and len(ep_sizes) != len(level_sizes):
        raise ValueError(f"ep_sizes {list(ep_sizes)} must give one size per level {list(level_sizes)}")
    levels, first = [], 0
    for i, n in enumerate(level_sizes):
        ep = choose_ep_size(n, world_size, max_padding_cost) if ep_sizes is None else int(ep_sizes[i])
        if ep < 1 or world_size % ep:
            raise ValueError(f"ep_size {ep} of level {i} must divide the world size {world_size}")
        levels.append(LevelPlacement(i, first, int(n), ep, -(-int(n) // ep) * ep))
        first += int(n)
    return Placement(world_size, tuple(levels))
