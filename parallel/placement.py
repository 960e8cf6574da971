"""Which tree node lives on which rank: one DeepSpeed MoE layer per level, each with its own ep_size.

DeepSpeed needs `num_experts % ep_size == 0` and `world % ep_size == 0`, and its expert-parallel
groups are runs of consecutive ranks (rank r is position r % ep_size of its group), where position p
holds slots [p * local, (p + 1) * local). DeepSpeed names checkpoint file `layer_L_expert_s` after the
slot s, so `LevelPlacement.slot_nodes` (saved with every checkpoint, see `TreeMoE.slot_nodes`) says which
node each slot holds. By default a level's nodes fill its slots in breadth-first order; when k-means gives
a count that does not divide ep_size, the last slots are idle padding (a 1-element placeholder that is
never routed to). When the expected per-rank load of that order is skewed past `max_skew` (uneven cluster
sizes), the nodes are placed by a greedy bin packing over ranks instead (`balanced_placement`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

IDLE = -1  # slot_nodes entry of an idle padding slot


@dataclass(frozen=True)
class LevelPlacement:
    """One granularity level: its nodes, its expert-parallel size, its padded slots and who sits in each."""

    level: int
    first_node: int
    num_nodes: int
    ep_size: int
    num_slots: int
    slot_nodes: tuple[int, ...]  # global node id held by each slot, IDLE for padding

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
        return [self.slot_nodes[s] for s in self.slots_on(ep_rank) if self.slot_nodes[s] != IDLE]

    def idle_on(self, ep_rank: int) -> int:
        return sum(1 for s in self.slots_on(ep_rank) if self.slot_nodes[s] == IDLE)

    def slot_of(self, node: int) -> int:
        """The slot (= DeepSpeed's global expert id in this layer) that holds global node `node`."""
        return self.slot_nodes.index(node)

    def position_of(self, node: int) -> int:
        """The expert-parallel position (ranks p, p + ep, ...) holding `node`."""
        return self.slot_of(node) // self.local_slots


@dataclass(frozen=True)
class Placement:
    world_size: int
    levels: tuple[LevelPlacement, ...]
    balanced: bool = False  # placed by expected load (balanced_placement) instead of node order

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
        The mean over ranks is always 1.0, so the maximum is the skew.
        """
        sizes = _sizes(cluster_sizes, self.num_nodes)
        loads = [0.0] * self.world_size
        for lv in self.levels:
            share = node_shares(lv, sizes)
            for rank in range(self.world_size):
                loads[rank] += lv.ep_size * sum(share[n] for n in lv.nodes_on(rank % lv.ep_size)) / len(self.levels)
        return loads

    def skew(self, cluster_sizes: Sequence[float] | None = None) -> float:
        """Busiest rank's expected expert compute over the mean rank's."""
        loads = self.expected_load(cluster_sizes)
        return max(loads) / (sum(loads) / len(loads))

    def report(self, params_per_node: Sequence[int], cluster_sizes: Sequence[float] | None = None) -> str:
        """Human-readable placement: nodes, parameters and expected load per rank, and what padding costs."""
        how = "by expected load (greedy bin packing)" if self.balanced else "in node order"
        lines = [f"placement of {self.num_nodes} experts on {self.world_size} ranks "
                 f"(levels {[lv.num_nodes for lv in self.levels]}), {how}:"]
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
            idle = sum(lv.idle_on(rank % lv.ep_size) for lv in self.levels)
            lines.append(f"  rank {rank}: nodes {nodes} (+{idle} idle), {params / 1e6:.3f}M params, "
                         f"expected load {load:.3f}x data parallel")
        idle_total = sum(lv.idle_slots for lv in self.levels)
        lines.append(f"  padding: {idle_total} idle slot(s), 1 parameter each, never routed to")
        lines.append(f"  skew: the busiest rank does {max(loads):.3f}x the mean rank's expert compute "
                     f"(expected step-time cost {100 * (max(loads) - 1):.1f}% from placement"
                     f"{' and cluster sizes' if cluster_sizes is not None else ''})")
        return "\n".join(lines)


def _sizes(cluster_sizes: Sequence[float] | None, num_nodes: int) -> list[float]:
    sizes = [float(s) for s in cluster_sizes] if cluster_sizes is not None else [1.0] * num_nodes
    if len(sizes) != num_nodes:
        raise ValueError(f"cluster_sizes has {len(sizes)} entries, the tree has {num_nodes} nodes")
    if any(s < 0 for s in sizes):
        raise ValueError(f"cluster_sizes must be >= 0, got {sizes}")
    return sizes


def node_shares(lv: LevelPlacement, sizes: Sequence[float]) -> dict[int, float]:
    """Share of the level's images each of its nodes gets under oracle routing (uniform when all are 0)."""
    nodes = range(lv.first_node, lv.first_node + lv.num_nodes)
    total = sum(sizes[n] for n in nodes)
    return {n: sizes[n] / total if total > 0 else 1.0 / lv.num_nodes for n in nodes}


def choose_ep_size(num_nodes: int, world_size: int, max_padding_cost: float = 0.15) -> int:
    """Largest divisor of the world whose idle padding costs at most `max_padding_cost`.

    With ep_size d every position holds ceil(n / d) slots, so with even clusters the busiest rank
    does d * ceil(n / d) / n times the balanced work; d = 1 (replicated) always costs nothing.
    """
    return max(d for d in range(1, world_size + 1)
               if world_size % d == 0 and d * -(-num_nodes // d) <= (1 + max_padding_cost) * num_nodes)


def balanced_placement(placement: Placement, cluster_sizes: Sequence[float]) -> Placement:
    """The same ep sizes and slot counts, nodes placed by expected load (largest first, each to the
    position whose busiest rank is least loaded so far, ties to the lowest position; levels in order).

    Deterministic in its inputs, so every rank computes the same placement; within a position the nodes
    keep ascending order and idle slots come last.
    """
    sizes = _sizes(cluster_sizes, placement.num_nodes)
    rank_load = [0.0] * placement.world_size
    levels = []
    for lv in placement.levels:
        share = node_shares(lv, sizes)
        held: list[list[int]] = [[] for _ in range(lv.ep_size)]
        for node in sorted(share, key=lambda n: (-share[n], n)):
            free = [p for p in range(lv.ep_size) if len(held[p]) < lv.local_slots]
            pos = min(free, key=lambda p: (max(rank_load[p::lv.ep_size]), p))
            held[pos].append(node)
            for rank in range(pos, placement.world_size, lv.ep_size):
                rank_load[rank] += lv.ep_size * share[node] / len(placement.levels)
        slots = [n for nodes in held for n in sorted(nodes) + [IDLE] * (lv.local_slots - len(nodes))]
        levels.append(replace(lv, slot_nodes=tuple(slots)))
    return Placement(placement.world_size, tuple(levels), balanced=True)


def plan_placement(level_sizes: Sequence[int], world_size: int, ep_sizes: Sequence[int] | None = None,
                   max_padding_cost: float = 0.15, cluster_sizes: Sequence[float] | None = None,
                   max_skew: float = 1.3) -> Placement:
    """Pick each level's ep_size (or take `ep_sizes`), pad its slots to a multiple of it and fill them in
    node order; with `cluster_sizes`, when that order's skew exceeds `max_skew`, place by expected load
    instead (if that lowers the skew)."""
    if world_size < 1 or not level_sizes or any(int(n) < 1 for n in level_sizes):
        raise ValueError(f"need world_size >= 1 and positive level sizes, got {world_size}, {list(level_sizes)}")
    if ep_sizes is not None and len(ep_sizes) != len(level_sizes):
        raise ValueError(f"ep_sizes {list(ep_sizes)} must give one size per level {list(level_sizes)}")
    levels, first = [], 0
    for i, n in enumerate(level_sizes):
        n = int(n)
        ep = choose_ep_size(n, world_size, max_padding_cost) if ep_sizes is None else int(ep_sizes[i])
        if ep < 1 or world_size % ep:
            raise ValueError(f"ep_size {ep} of level {i} must divide the world size {world_size}")
        slots = -(-n // ep) * ep
        levels.append(LevelPlacement(i, first, n, ep, slots, tuple(range(first, first + n)) + (IDLE,) * (slots - n)))
        first += n
    placement = Placement(world_size, tuple(levels))
    if cluster_sizes is not None and placement.skew(cluster_sizes) > max_skew:
        packed = balanced_placement(placement, cluster_sizes)
        if packed.skew(cluster_sizes) < placement.skew(cluster_sizes):
            return packed
    return placement
