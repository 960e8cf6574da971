"""Typed config: files, overrides, flags, errors, ds_config merge."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from unirestorer.train.config import (ConfigError, RunConfig, add_common_args, build_ds_config, config_from_args,
                                      from_dict, load_config)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["extractor.toml", "cluster.toml", "experts.toml", "router.yaml"])
def test_example_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.stage == name.split(".")[0]
    assert json.loads(cfg.pretty()) == cfg.to_dict()


def test_file_values_and_defaults(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[train]\nlr = 1\nbetas = [0.8, 0.9]\n[model]\nnum_blocks = [2, 2]\n')
    cfg = load_config(p)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # TOML int into a float field
    assert cfg.train.betas == [0.8, 0.9] and cfg.model.num_blocks == [2, 2]
    assert cfg.train.max_steps == RunConfig().train.max_steps


def test_overrides_convert_types() -> None:
    cfg = load_config(None, ["train.lr=2e-4", "train.max_steps=7", "train.init_from_parent=false",
                             "model.num_blocks=[1, 2,3]", "data.train_shards=a.tar,b.tar", "train.init_ckpt=x/y",
                             "deepspeed.bf16=none", "model.arch=nafnet"])
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 7 and cfg.train.init_from_parent is False
    assert cfg.model.num_blocks == [1, 2, 3] and cfg.data.train_shards == ["a.tar", "b.tar"]
    assert cfg.train.init_ckpt == "x/y" and cfg.deepspeed.bf16 is None and cfg.model.arch == "nafnet"
    assert load_config(None, ["train.init_ckpt=null"]).train.init_ckpt is None


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; valid keys in [train]: stage, max_steps"),
    ("trian.lr=1", "unknown config section 'trian' in 'trian.lr'; valid sections: data, model, tree"),
    ("train.max_steps=1.5", "train.max_steps: expected int, got '1.5'"),
    ("train.init_from_parent=maybe", "train.init_from_parent: expected a bool"),
    ("model.num_blocks=[1,x]", "model.num_blocks[1]: expected int, got 'x'"),
    ("lr=1", "must look like section.key=value"),
])
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    bad_type = tmp_path / "t.toml"
    bad_type.write_text('[train]\nmax_steps = "ten"\n')
    with pytest.raises(ConfigError, match=f"{bad_type}: train.max_steps: expected int"):
        load_config(bad_type)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("model:\n  dimm: 3\n")
    with pytest.raises(ConfigError, match=f"{unknown}: unknown config key 'model.dimm'"):
        load_config(unknown)
    broken = tmp_path / "b.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match=f"config file {broken}:"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown format '.ini'"):
        (tmp_path / "c.ini").write_text("")
        load_config(tmp_path / "c.ini")


def test_cli_flags_win_over_file_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[train]\nmax_steps = 100\nseed = 3\n[ckpt]\nevery = 9\n")
    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(["--local_rank=1", "--config", str(p), "--max-steps", "5", "--ckpt-dir", "ck",
                              "--resume", "none", "--log-dir", "lg", "train.seed=4", "train.max_steps=50"])
    cfg = config_from_args(args)
    assert (cfg.train.max_steps, cfg.train.seed, cfg.ckpt.every) == (5, 4, 9)
    assert (cfg.ckpt.dir, cfg.ckpt.resume, cfg.log.dir) == ("ck", "none", "lg")
    assert config_from_args(parser.parse_args(["--seed", "8"])).train.seed == 8


def test_ds_config_merge(tmp_path: Path) -> None:
    cfg = RunConfig()
    ds = build_ds_config(cfg, "cpu")
    assert ds["bf16"]["enabled"] is False and build_ds_config(cfg, "cuda")["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert "optimizer" not in ds  # the stages pass their own torch.optim.AdamW
    cfg = load_config(None, ["deepspeed.micro_batch=3", "deepspeed.grad_accum=2", "deepspeed.grad_clip=0.5",
                             "deepspeed.bf16=true", "deepspeed.zero_stage=1"])
    ds = build_ds_config(cfg, "cpu")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"],
            ds["bf16"]["enabled"], ds["zero_optimization"]["stage"]) == (3, 2, 0.5, True, 1)
    with pytest.raises(ConfigError, match="ZeRO stage 3 cannot be used with MoE"):
        build_ds_config(load_config(None, ["deepspeed.zero_stage=3"]), "cpu")
    no_clip = tmp_path / "ds.json"
    no_clip.write_text('{"train_micro_batch_size_per_gpu": 1}')
    with pytest.raises(ConfigError, match="set gradient_clipping explicitly"):
        build_ds_config(load_config(None, [f"deepspeed.config={no_clip}"]), "cpu")


def test_config_round_trips_through_checkpoint_format(tmp_path: Path) -> None:
    """The config dict goes into DeepSpeed's client_state: it must load with weights_only=True."""
    cfg = load_config(REPO / "configs" / "experts.toml")
    torch.save({"config": cfg.to_dict()}, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert back == cfg.to_dict() and from_dict(back) == cfg


def test_extractor_stage_refuses_a_patch_size_other_than_its_crop() -> None:
    """Trained on 64-px patches but embedding 32-px crops, the extractor recognised nothing (issue 9)."""
    from unirestorer.train.stage_extractor import ExtractorStage

    cfg = load_config(None, ["data.train_shards=[x.tar]", "data.patch_size=64", "model.extractor_crop=32"])
    with pytest.raises(ConfigError, match=r"data.patch_size=64 but model.extractor_crop=32; the extractor must train "
                                          r"at the crop size it embeds with"):
        ExtractorStage().build(cfg, None)
