"""The paper's LoRA tree (model.lora_rank > 0): trained through the experts stage on 2 real CPU ranks (gloo,
real DeepSpeed), resumed, routed, exported; its bundle, schema and config errors.

One spawn runs extractor → cluster → experts (levels [1, 2, 4] on ep [1, 2, 2]; the root trains steps 0-1,
level 1 steps 2-3, level 2 step 4) → a resume of it from step 4 → one router step (tests/lora_tree_worker.py).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import lora_tree_worker  # noqa: E402

from conftest import TINY_EXPERT, TINY_EXTRACTOR, build_tiny_unirestorer  # noqa: E402
from test_train_stages import spawn_stage_workers, write_shards  # noqa: E402

LEVELS, LORA = [1, 2, 4], {"rank": 4, "alpha": 8.0}
LEVEL1, LEVEL2 = (1, 2), (3, 4, 5, 6)


def configs(root: Path, shards: dict[str, str]) -> dict[str, dict]:
    m = TINY_EXTRACTOR
    common = {
        "data": {"train_shards": [shards["noise"], shards["blur"]], "patch_size": 32, "num_workers": 0,
                 "shuffle_buffer": 4, "batches_per_epoch": 4},
        "model": {"arch": "nafnet", "preset": "tiny", "extractor_backbone": m["backbone"], "embed_dim": m["embed_dim"],
                  "extractor_proj_dim": m["proj_dim"], "extractor_crop": 32, "extractor_max_crops": m["max_crops"],
                  "lora_rank": LORA["rank"], "lora_alpha": LORA["alpha"]},
        "deepspeed": {"micro_batch": 2},
    }
    tree = {"levels": LEVELS, "num_samples": 16, "path": str(root / "tree"), "ep_sizes": [1, 2, 2]}

    def stage(name: str, run: str, steps: int, train: dict, every: int, **sections) -> dict:
        return {**common, **sections, "train": {"stage": name, "max_steps": steps, "lr": 1e-3, **train},
                "log": {"dir": str(root / "logs" / run), "every": 1, "val_every": 0},
                "ckpt": {"dir": str(root / "ckpt" / run), "every": every, "keep_last": 3, "resume": "auto"}}

    lora_tree = {"init_ckpt": str(root / "ckpt" / "extractor"), "level_start_steps": [0, 2, 4],
                 "level_end_steps": [2, 4, 5]}
    return {
        "extractor": stage("extractor", "extractor", 2, {}, 2),
        "cluster": stage("cluster", "cluster", 0, {"init_ckpt": str(root / "ckpt" / "extractor")}, 1, tree=tree),
        **{run: stage("experts", run, 5, lora_tree, 2, tree=tree) for run in ("experts_a", "experts_b")},
        "router": stage("router", "router", 1, {"init_ckpt": str(root / "ckpt" / "experts_a"), "schedule": "constant"},
                        1, tree={**tree, "path": ""}),
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_tree")
    cfgs = configs(root, write_shards(root))
    spawn_stage_workers(lora_tree_worker.run, cfgs, root)
    reports = [json.loads((root / f"report_rank{r}.json").read_text()) for r in range(2)]
    return root, cfgs, reports


def by_node(step: Path) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """Expert weights per tree node and the stage state of checkpoint `step`."""
    from unirestorer.train.weights import expert_files_by_node, read_checkpoint

    ckpt = read_checkpoint(step)
    files = expert_files_by_node(ckpt, LEVELS)
    return {n: ckpt.experts[files[n]] for n in range(sum(LEVELS))}, ckpt.client_state["stage_state"]


def lora_part(state: dict[str, torch.Tensor], lora: bool = True) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B")) == lora}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_tree_trains_through_the_experts_stage(pipeline):
    from unirestorer.train.tree_stage import node_factory

    root, _, reports = pipeline
    for report in reports:
        assert report["codes"] == {"extractor": 0, "cluster": 0, "experts_a": 0, "experts_b": 0, "router": 0}
    ckpts = {s: by_node(root / "ckpt" / "experts_a" / f"step_{s:08d}") for s in (2, 4, 5)}
    w, state = ckpts[5]
    assert json.loads(state["expert_lora"]) == LORA
    assert json.loads(state["expert_spec"]) == {"name": "nafnet", "preset": "tiny", "stat_window": 32}  # create_expert kwargs
    seen, parents = state["images_seen"], json.loads(state["tree_meta"])["parents"]
    # the root is a full expert, trained (steps 0, 1) and then unchanged; every other node's base is exactly it
    initial_root = node_factory(json.loads(state["expert_spec"]), 0, LORA)(0).state_dict()
    assert not lora_part(w[0]) and not equal(w[0], initial_root)
    assert equal(ckpts[2][0][0], w[0]) and equal(ckpts[4][0][0], w[0])
    for n in range(1, 7):
        assert equal(lora_part(w[n], lora=False), w[0]), n
    # level 1 (steps 2, 3): lora_B left zero exactly where no image came; unchanged after its end
    assert all(seen[n] > 0 for n in LEVEL1)
    for n in LEVEL1:
        assert bool(lora_part(w[n])["intro.lora_B"].abs().sum() > 0) == bool(seen[n] > 0), n
        assert equal(lora_part(ckpts[4][0][n]), lora_part(w[n])), n
    # level 2 (step 4) started as a copy of its parent's LoRA; the nodes that got images moved on from it
    assert any(seen[n] > 0 for n in LEVEL2)
    for n in LEVEL2:
        assert equal(lora_part(w[n]), lora_part(w[parents[n]])) == bool(seen[n] == 0), n
    # the optimizer never held a LoRA base; after the run no base requires grad (only LoRA, or nothing)
    for report in reports:
        for node, names in report["in_optimizer"].items():
            if node == "0":
                assert names == sorted(initial_root)
            else:
                assert names and all(k.endswith((".lora_A", ".lora_B")) for k in names), node
        assert all(all(k.endswith((".lora_A", ".lora_B")) for k in names) for n, names in report["grad_after"].items()
                   if n != "0")
    assert {n for r in reports for n in r["in_optimizer"]} == {str(n) for n in range(7)}


@pytest.mark.slow
def test_lora_tree_resume_is_exact(pipeline):
    """B = A's step-4 checkpoint resumed to step 5 (level 2 copies its loaded parents then): bit-identical."""
    root, _, _ = pipeline
    a, _ = by_node(root / "ckpt" / "experts_a" / "step_00000005")
    b, _ = by_node(root / "ckpt" / "experts_b" / "step_00000005")
    assert all(equal(a[n], b[n]) for n in a)
    losses = [{m["step"]: m["train/loss"] for m in map(json.loads, (root / "logs" / run / "metrics.jsonl")
                                                      .read_text().splitlines()) if "train/loss" in m}
              for run in ("experts_a", "experts_b")]
    assert losses[1] == {5: losses[0][5]}


@pytest.mark.slow
def test_lora_tree_bundle_from_the_router_checkpoint(pipeline, tmp_path, one_thread):
    from unirestorer.model.lora import merge_lora
    from unirestorer.model.unirestorer import UniRestorer, bundle_bytes
    from unirestorer.train.export import export, restorer_from_checkpoint
    from unirestorer.train.weights import read_checkpoint

    root, _, _ = pipeline
    note = export(root / "ckpt" / "router", tmp_path / "lora")
    assert "router stage" in note
    config = json.loads((tmp_path / "lora" / "bundle.json").read_text())
    assert config["experts"]["0"] == TINY_EXPERT
    assert all(config["experts"][str(n)] == {**TINY_EXPERT, "lora": {**LORA, "base": 0}} for n in range(1, 7))
    with safe_open(str(tmp_path / "lora" / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    model, _ = restorer_from_checkpoint(read_checkpoint(root / "ckpt" / "router"))
    assert {k[len("experts.0."):] for k in keys if k.startswith("experts.0.")} == set(model.expert(0).state_dict())
    for n in range(1, 7):
        stored = {k for k in keys if k.startswith(f"experts.{n}.")}
        assert stored and all(k.endswith((".lora_A", ".lora_B")) for k in stored), n

    merged = copy.deepcopy(model)  # the same tree with every LoRA folded in: what a full-tree bundle stores
    for n in range(7):
        merge_lora(merged.expert(n))
    merged.save_bundle(tmp_path / "full")
    assert bundle_bytes(tmp_path / "lora") < bundle_bytes(tmp_path / "full")
    assert model.stored_parameters() < merged.stored_parameters()
    assert model.stored_parameters() == sum(f.get_tensor(k).numel() for f in [safe_open(
        str(tmp_path / "lora" / "weights.safetensors"), "pt")] for k in keys)

    back = UniRestorer.load_bundle(tmp_path / "lora")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for n in range(7):
            torch.testing.assert_close(back.expert(n)(x), merged.expert(n)(x), atol=1e-5, rtol=0)
    out, info = back.restore(x)
    ref, ref_info = merged.restore(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert info == ref_info


@pytest.mark.slow
def test_experts_stage_refuses_a_changing_root_and_other_lora_on_resume(pipeline):
    from unirestorer.launch.env import DistInfo
    from unirestorer.train.config import ConfigError, from_dict
    from unirestorer.train.stage_experts import ExpertsStage
    from unirestorer.train.stage_state import tree_from_state

    root, cfgs, _ = pipeline
    raw = copy.deepcopy(cfgs["experts_a"])
    raw["tree"]["ep_sizes"] = []
    raw["train"]["level_end_steps"] = [3, 4, 5]
    with pytest.raises(ConfigError, match=r"level_end_steps\[0\]=3 > train.level_start_steps\[1\]=2"):
        ExpertsStage().build(from_dict(raw), DistInfo(0, 0, 1, torch.device("cpu")))
    # resuming the LoRA tree's checkpoint with other LoRA settings is refused by name
    _, state = by_node(root / "ckpt" / "experts_a" / "step_00000005")
    stage = ExpertsStage()
    stage.tree, stage.lora = tree_from_state(state, "test"), {"rank": 2, "alpha": 8.0}
    with pytest.raises(ConfigError, match=r"the checkpoint's experts have LoRA \{\"rank\": 4, \"alpha\": 8.0\}, the "
                                          r"config asks for \{\"rank\": 2"):
        stage.load_state(state)


def lora_args(*overrides: str) -> tuple:
    from unirestorer.train.config import load_config
    from unirestorer.train.stage_experts import level_schedule

    cfg = load_config(None, ["model.lora_rank=8", "train.max_steps=10", *overrides])
    _, starts, ends = level_schedule(cfg, 3)
    return cfg, starts, ends


def test_lora_tree_config_errors():
    from unirestorer.train.config import ConfigError, load_config
    from unirestorer.train.stage_experts import check_lora_tree
    from unirestorer.train.tree_stage import expert_lora

    assert load_config(None).model.lora_alpha == 16.0
    with pytest.raises(ConfigError, match=r"the root level must end no later than level 1 starts \(train.level_end_"
                                          r"steps\[0\]=10 > train.level_start_steps\[1\]=3\)"):
        check_lora_tree(*lora_args())  # default schedule: every level trains until max_steps
    with pytest.raises(ConfigError, match="model.lora_rank=8 needs train.init_from_parent = true"):
        check_lora_tree(*lora_args("train.init_from_parent=false", "train.level_end_steps=[3,10,10]"))
    cfg, starts, ends = lora_args("train.level_end_steps=[3,10,10]")
    check_lora_tree(cfg, starts, ends)
    assert expert_lora(cfg) == {"rank": 8, "alpha": 16.0}
    check_lora_tree(*lora_args("model.lora_rank=0"))  # full experts: no constraint
    with pytest.raises(ConfigError, match=r"model.lora_rank=8 / model.lora_alpha=0.0: .* alpha > 0"):
        expert_lora(load_config(None, ["model.lora_rank=8", "model.lora_alpha=0"]))


def lora_unirestorer():
    """The tiny fixture model as a LoRA tree: nodes 1-6 = the root + a non-zero LoRA each."""
    from unirestorer.model.experts import create_expert
    from unirestorer.model.lora import init_child_from_parent

    model = build_tiny_unirestorer()
    for n in range(1, 7):
        expert = init_child_from_parent(create_expert(**TINY_EXPERT), model.expert(0), mode="lora", rank=4, alpha=8)
        with torch.no_grad():
            for name, p in expert.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(n))
        model.experts[str(n)] = expert.eval()
    return model


def test_save_bundle_refuses_a_lora_expert_not_on_the_root(tmp_path, one_thread):
    model = lora_unirestorer()
    with torch.no_grad():
        model.expert(5).intro.weight.add_(1e-3)  # its base is no longer the root's weights
    with pytest.raises(ValueError, match=r"expert 5 has LoRA on a base that is not the root's weights \('intro.weight"):
        model.save_bundle(tmp_path)
    assert not (tmp_path / "weights.safetensors").exists()


@pytest.mark.parametrize("lora, message", [
    ({"rank": 0, "alpha": 8.0, "base": 0}, r"experts.3.lora: rank must be >= 1 and alpha > 0"),
    ({"rank": 4, "alpha": -1.0, "base": 0}, r"experts.3.lora: rank must be >= 1 and alpha > 0"),
    ({"rank": 4, "alpha": 8.0}, r"experts.3.lora: required key 'base' is missing"),
    ({"rank": 4, "alpha": 8.0, "base": 0, "scale": 2}, r"experts.3.lora: unknown key 'scale'"),
    ({"rank": "4", "alpha": 8.0, "base": 0}, r"experts.3.lora.rank: \"4\" is not a valid int"),
    ({"rank": 4, "alpha": 8.0, "base": 3}, r"experts.3.lora.base: 3 is not another tree node with a plain"),
    ({"rank": 4, "alpha": 8.0, "base": 4}, r"experts.3.lora.base: 4 is not another tree node with a plain"),
    ({"rank": 4, "alpha": 8.0, "base": 9}, r"experts.3.lora.base: 9 is not another tree node with a plain"),
    ([4, 8.0, 0], r"experts.3.lora: expected an object"),
])
def test_bundle_schema_refuses_malformed_lora(tmp_path, one_thread, lora, message):
    from unirestorer.model.bundle_schema import BundleError
    from unirestorer.model.unirestorer import UniRestorer

    model = lora_unirestorer()
    model.save_bundle(tmp_path)
    config = json.loads((tmp_path / "bundle.json").read_text())
    assert config["experts"]["3"]["lora"] == {"rank": 4, "alpha": 8, "base": 0}
    config["experts"]["3"]["lora"] = lora
    (tmp_path / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=message):
        UniRestorer.load_bundle(tmp_path)


def test_bundle_schema_refuses_a_base_of_another_spec(tmp_path, one_thread):
    from unirestorer.model.bundle_schema import BundleError
    from unirestorer.model.unirestorer import UniRestorer

    lora_unirestorer().save_bundle(tmp_path)
    config = json.loads((tmp_path / "bundle.json").read_text())
    config["experts"]["0"] = {**TINY_EXPERT, "width": 16}
    (tmp_path / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"experts.1.lora.base: node 0's spec .* differs from this expert's"):
        UniRestorer.load_bundle(tmp_path)


def test_lora_bundle_round_trip_in_process(tmp_path, one_thread):
    from unirestorer.model.unirestorer import UniRestorer

    model = lora_unirestorer()
    model.save_bundle(tmp_path)
    back = UniRestorer.load_bundle(tmp_path)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n in range(7):
            torch.testing.assert_close(back.expert(n)(x), model.expert(n)(x), atol=1e-6, rtol=0)
    back.save_bundle(tmp_path / "again")  # a reloaded LoRA tree saves as it was loaded
    assert (tmp_path / "again" / "bundle.json").read_text() == (tmp_path / "bundle.json").read_text()
