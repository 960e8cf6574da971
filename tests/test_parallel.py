"""Expert parallelism on DeepSpeed: placement, dropless dispatch, ZeRO-1/2 and checkpoints.

The distributed cases run 2 real ranks (torch.multiprocessing) or 4 (the real `deepspeed` launcher), gloo,
DS_ACCELERATOR=cpu, the real deepspeed.initialize, and compare with one process holding every expert;
each launch packs several steps (and the 4-rank one several cases) to keep the suite short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import parallel_worker  # noqa: E402
from conftest import free_port  # noqa: E402

from unirestorer.parallel.placement import plan_placement  # noqa: E402

TOL = 1e-5


@pytest.fixture
def cpu_deepspeed(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return tmp_path


def run_case(case: dict, tmp_path: Path) -> list[dict]:
    case = {**case, "ckpt_dir": str(tmp_path / "ckpt")}
    mp.start_processes(parallel_worker.run, args=(2, free_port(), case, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text())["errors"] for r in range(2)]


def run_launcher(cases: dict[str, dict], tmp_path: Path, ranks: int = 4) -> dict[str, list[dict]]:
    """All cases in one `deepspeed --num_gpus <ranks>` launch of tests/parallel_worker.py."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--no_local_rank",
                           str(Path(parallel_worker.__file__)), str(tmp_path / "cases.json"), str(tmp_path)],
                          env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return {name: [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in range(ranks)] for name in cases}


def assert_all_match(results: list[dict]) -> None:
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.slow
def test_zero2_uneven_idle_padding_and_checkpoint(cpu_deepspeed):
    """Levels [1, 3, 4] with ep_size [1, 2, 2], level 1 padded 3 -> 4. Node 3 and 7 get no image;
    step 0: k = 3 with 3 + 1 images; step 1: k = 1 with 4 + 0 images; step 2: router-style no_grad."""
    case = {"level_sizes": [1, 3, 4], "ep_sizes": [1, 2, 2], "zero": 2, "size": 16, "steps": [
        {"seed": 0, "k": 3, "batch": [3, 1], "grad": True, "idle": [3, 7]},
        {"seed": 1, "k": 1, "batch": [4, 0], "grad": True, "idle": [3]},
        {"seed": 2, "k": 1, "batch": [2, 3], "grad": False, "idle": []},
    ]}
    results = run_case(case, cpu_deepspeed)
    assert set(results[0]) >= {"step0_params", "step1_input_grad", "step2_output", "ckpt_not_bit_exact"}
    assert_all_match(results)


@pytest.mark.slow
def test_zero1_replicated_level_and_empty_rank(cpu_deepspeed):
    """Levels [1, 2, 4] with ep_size [1, 1, 2]: a two-expert level replicated next to a sharded one;
    rank 1 holds no image in step 0 (k = 3)."""
    case = {"level_sizes": [1, 2, 4], "ep_sizes": [1, 1, 2], "zero": 1, "size": 16, "steps": [
        {"seed": 3, "k": 3, "batch": [2, 0], "grad": True, "idle": [4]},
        {"seed": 4, "k": 1, "batch": [1, 3], "grad": True, "idle": []},
    ]}
    assert_all_match(run_case(case, cpu_deepspeed))


@pytest.mark.slow
def test_four_ranks_two_communicating_exchanges(cpu_deepspeed):
    """4 ranks, levels [1, 3, 6]: ep [1, 2, 4] (ZeRO-2) and [1, 4, 2] (ZeRO-1) put two different groups in one
    step, [1, 4, 4] (ZeRO-2) shares one, placed by expected load (skewed cluster sizes). Idle padding slots in
    every case, nodes no image reaches, uneven batches with empty ranks, k = 3 and k = 1, no_grad; then the
    checkpoint round trip (the two ZeRO-2 cases)."""
    idle = {"seed": 0, "k": 3, "batch": [3, 1, 0, 2], "grad": True, "idle": [3, 9]}
    steps = [idle, {"seed": 1, "k": 1, "batch": [0, 2, 1, 3], "grad": True, "idle": [1, 5]},
             {"seed": 2, "k": 1, "batch": [1, 0, 2, 1], "grad": False, "idle": []}]
    base = {"level_sizes": [1, 3, 6], "size": 16, "steps": steps}
    skewed = [100, 60, 30, 10, 50, 40, 5, 2, 2, 1]
    results = run_launcher({
        "ep124_zero2": {**base, "ep_sizes": [1, 2, 4], "zero": 2},
        "ep142_zero1": {**base, "ep_sizes": [1, 4, 2], "zero": 1, "ckpt": False,
                        "steps": [{**idle, "batch": [0, 0, 3, 1]}, *steps[1:]]},
        "ep144_zero2_balanced": {**base, "ep_sizes": [1, 4, 4], "zero": 2, "cluster_sizes": skewed, "steps": steps[:2]},
    }, cpu_deepspeed)
    for name, ranks in results.items():
        assert set(ranks[0]["errors"]) >= {"step0_params", "step1_input_grad", "step1_output"}
        assert_all_match([r["errors"] for r in ranks])
        # every node on exactly its ep position's ranks: level 2 of [1, 2, 4] lives once on each quarter
        held = [set(r["nodes"]) for r in ranks]
        assert all(0 in h for h in held) and set.union(*held) == set(range(10)), name
        assert all(r["slot_nodes"] == ranks[0]["slot_nodes"] for r in ranks), name  # one layout on every rank
    assert all("ckpt_not_bit_exact" in results[name][0]["errors"] for name in ("ep124_zero2", "ep144_zero2_balanced"))
    assert [r["nodes"] for r in results["ep124_zero2"]] == [[0, 1, 2, 4, 5], [0, 3, 6, 7], [0, 1, 2, 8, 9], [0, 3]]
    assert [r["nodes"] for r in results["ep142_zero1"]] == [[0, 1, 4, 5, 6], [0, 2, 7, 8, 9], [0, 3, 4, 5, 6], [0, 7, 8, 9]]
    balanced = results["ep144_zero2_balanced"][0]
    assert balanced["balanced"] and balanced["slot_nodes"] == [[0, -1, -1, -1, -1, -1, -1, -1], [1, 2, 3, -1, -1, -1, -1, -1],
                                                               [-1, -1, 6, 7, 5, 8, 4, 9]]


def test_placement_report_seven_experts_on_two_ranks():
    placement = plan_placement([1, 7], world_size=2)
    assert [(lv.ep_size, lv.num_slots, lv.idle_slots) for lv in placement.levels] == [(1, 1, 0), (2, 8, 1)]
    assert placement.nodes_on_rank(0) == [0, 1, 2, 3, 4] and placement.nodes_on_rank(1) == [0, 5, 6, 7]
    report = placement.report(params_per_node=[1000] * 8)
    assert "level 1: 7 experts, ep_size 2, 8 slots, 4 per rank" in report
    assert "1 idle padding slot(s)" in report
    assert "rank 1: nodes [0, 5, 6, 7] (+1 idle), 0.004M params" in report
    # uniform clusters: rank 0 serves 4/7 of level 1 -> (1 + 2 * 4/7) / 2 = 1.071x data parallel
    assert "rank 0: nodes [0, 1, 2, 3, 4] (+0 idle), 0.005M params, expected load 1.071x" in report
    assert "busiest rank does 1.071x" in report
    # skewed clusters move the load: node 7 (on rank 1) holds most images
    loads = placement.expected_load([10, 1, 1, 1, 1, 1, 1, 10])
    assert loads[1] > loads[0]


def test_skewed_clusters_are_placed_by_expected_load():
    """[1, 7, 19] on 8 ranks (ep [1, 8, 4]): leaves 0-4 (position 0 in node order) hold most images. Node order
    then skews past 1.3x, so the slots are bin-packed by load: same ep sizes and slot counts, every node once,
    deterministic, lower skew. Near-even clusters keep node order (file layout unchanged)."""
    sizes = [1000] + [100] * 7 + [200] * 5 + [20] * 14
    plain, packed = plan_placement([1, 7, 19], 8), plan_placement([1, 7, 19], 8, cluster_sizes=sizes)
    assert plain.skew(sizes) > 1.3 and not plain.balanced
    assert packed.balanced and packed.skew(sizes) < 1.2 < 1.3 < plain.skew(sizes)
    assert packed == plan_placement([1, 7, 19], 8, cluster_sizes=list(sizes))  # what every rank computes
    for lv, ref in zip(packed.levels, plain.levels):
        assert (lv.ep_size, lv.num_slots) == (ref.ep_size, ref.num_slots)
        assert sorted(n for n in lv.slot_nodes if n >= 0) == list(range(lv.first_node, lv.first_node + lv.num_nodes))
        for node in range(lv.first_node, lv.first_node + lv.num_nodes):
            assert node in lv.nodes_on(lv.position_of(node)) and lv.slot_nodes[lv.slot_of(node)] == node
    # the heavy leaves 8..12 now sit on different positions of level 2 (5 slots each)
    assert len({packed.levels[2].position_of(n) for n in range(8, 13)}) == 4
    assert packed.skew(sizes) == pytest.approx(max(packed.expected_load(sizes)))
    assert "by expected load (greedy bin packing)" in packed.report([1] * 27, sizes)
    assert "skew: the busiest rank does" in packed.report([1] * 27, sizes)
    even = [1000] + [100] * 7 + [37] * 19
    assert not plan_placement([1, 7, 19], 8, cluster_sizes=even).balanced
    assert plan_placement([1, 7, 19], 8, cluster_sizes=even).levels == plain.levels
    with pytest.raises(ValueError, match="cluster_sizes has 3 entries, the tree has 27 nodes"):
        plan_placement([1, 7, 19], 8, cluster_sizes=[1, 2, 3])


def test_placement_rejects_bad_sizes():
    with pytest.raises(ValueError, match="must divide the world size 4"):
        plan_placement([1, 7], world_size=4, ep_sizes=[1, 3])
    # 19 on 8: ep_size 8 leaves 5 idle slots (26%), 4 pads one (5%); 7 on 8 pads one (14%); 3 on 2 replicates
    assert [lv.ep_size for lv in plan_placement([1, 7, 19], 8).levels] == [1, 8, 4]
    assert [lv.ep_size for lv in plan_placement([1, 3, 4], 2).levels] == [1, 1, 2]


def test_ds_config_rejects_zero3_and_implicit_clipping():
    from unirestorer.parallel.tree_moe import check_ds_config

    with pytest.raises(ValueError, match="ZeRO stage 3 does not support DeepSpeed MoE"):
        check_ds_config({"zero_optimization": {"stage": 3}, "gradient_clipping": 0.0})
    with pytest.raises(ValueError, match="gradient_clipping explicitly"):
        check_ds_config({"zero_optimization": {"stage": 2}})
    check_ds_config({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0})


def test_single_process_layer_matches_its_experts():
    """World of one (no process group): every level replicated, outputs in input order, experts
    without images still get (zero) gradients, and the report counts parameters on the meta device."""
    import torch

    from unirestorer.parallel.tree_moe import TreeMoE

    factory = parallel_worker.make_factory(seed=3)
    layer = TreeMoE(factory, [1, 2])
    images, ids = torch.rand(2, 3, 16, 16), torch.tensor([[2, 0], [0, 2]])
    out = layer(images, ids)
    assert out.shape == (2, 2, 3, 16, 16)
    assert torch.allclose(out[0, 0], layer.local_module(2)(images[:1])[0], atol=TOL)
    assert torch.allclose(out[1, 0], layer.local_module(0)(images[1:])[0], atol=TOL)
    out.sum().backward()
    idle = list(layer.local_module(1).parameters())
    assert all(p.grad is not None and not p.grad.any() for p in idle)
    with pytest.raises(ValueError, match=r"node ids must lie in \[0, 3\)"):
        layer(images, torch.tensor([[3], [0]]))
    assert "rank 0: nodes [0, 1, 2] (+0 idle)" in layer.placement_report(factory)


def test_expert_files_by_node_follows_the_saved_slot_table():
    """A checkpoint's slot table maps nodes to per-expert files (layer, slot); without one: node order."""
    import torch

    from unirestorer.train.checkpoint import CheckpointError
    from unirestorer.train.weights import Checkpoint, expert_files_by_node

    table = torch.tensor([[0, -1, -1, -1], [2, -1, 1, -1]])  # level 1 placed by load: node 2 in slot 0
    experts = {(0, 0): {}, (1, 0): {}, (1, 1): {}, (1, 2): {}, (1, 3): {}}
    ck = Checkpoint(Path("ck"), {"tree_moe.slot_nodes": table}, experts, {}, {}, 1)
    assert expert_files_by_node(ck, [1, 2]) == {0: (0, 0), 1: (1, 2), 2: (1, 0)}
    assert expert_files_by_node(Checkpoint(Path("ck"), {}, experts, {}, {}, 1), [1, 2]) == {0: (0, 0), 1: (1, 0),
                                                                                           2: (1, 1)}
    del experts[(1, 2)]
    with pytest.raises(CheckpointError, match=r"no per-expert file for tree node\(s\) \[1\].*layer_1_expert_2"):
        expert_files_by_node(ck, [1, 2])
    with pytest.raises(CheckpointError, match="the tree has 3 levels: not a checkpoint of this tree"):
        expert_files_by_node(ck, [1, 2, 4])
