"""`unirestorer export CKPT_DIR --out BUNDLE`: one inference bundle from an experts or router checkpoint.

One process, no DeepSpeed (not even imported): weights.py reads the dense file (extractor, router) and the
per-expert files; the checkpoint's slot table says which node each file holds (`weights.expert_files_by_node`;
idle padding slots are skipped). The tree, the
extractor's and experts' constructor kwargs (and a LoRA tree's rank/alpha) come from the checkpoint's stage
state, so a checkpoint is all it needs. The training config and the source checkpoint are added to
bundle.json; of a LoRA tree the bundle stores the root in full and only the LoRA of every other node.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unirestorer.safe_files import UnsafePathError, atomic_write, check_writable, output_folder

# torch and the model load only when an export runs: `unirestorer` (whose module imports this one) starts in a
# fraction of a second, and so do the worker processes `shards write` spawns, which import it again
if TYPE_CHECKING:
    from unirestorer.model.unirestorer import UniRestorer
    from unirestorer.train.weights import Checkpoint

EXPERTS_ONLY_NOTE = ("{path} is an experts-stage checkpoint: the router in the bundle is freshly initialised. Its "
                     "gates are zero, so every leaf and level is equally likely and the argmax picks the first "
                     "leaf at level 0: every image is restored by the root expert until a router stage is trained.")


def restorer_from_checkpoint(ckpt: Checkpoint) -> tuple[UniRestorer, str]:
    """The single-process model of an experts or router checkpoint, and a note on what it holds."""
    from unirestorer.model.lora import tree_expert
    from unirestorer.model.router import Router
    from unirestorer.model.unirestorer import UniRestorer
    from unirestorer.train.checkpoint import CheckpointError
    from unirestorer.train.stage_state import extractor_from_checkpoint, tree_from_state
    from unirestorer.train.weights import expert_files_by_node, load_submodule

    stage, state = ckpt.client_state.get("stage"), ckpt.client_state.get("stage_state", {})
    if stage not in ("experts", "router") or "tree_meta" not in state:
        raise CheckpointError(f"{ckpt.path}: a checkpoint of stage {stage!r}; export needs one of the experts or "
                              f"router stage (it holds the tree and every expert)")
    tree = tree_from_state(state, str(ckpt.path))
    spec, lora = json.loads(state["expert_spec"]), json.loads(state.get("expert_lora", "null"))
    extractor = extractor_from_checkpoint(ckpt)
    if stage == "router":
        router = Router(**json.loads(state["router_config"]))
        load_submodule(router, ckpt.dense, "router.")
        note = f"router stage, step {ckpt.step}"
    else:
        router, note = Router.from_tree(tree), EXPERTS_ONLY_NOTE.format(path=ckpt.path)
    experts = {}
    for node, key in sorted(expert_files_by_node(ckpt, tree.level_sizes).items()):
        experts[node] = tree_expert(spec, node, lora)
        try:
            experts[node].load_state_dict(ckpt.experts[key])
        except RuntimeError as err:
            raise CheckpointError(f"{ckpt.path}: expert file of node {node} does not fit {spec} (LoRA {lora}): "
                                  f"{err}") from None
    model = UniRestorer(extractor.eval(), tree, router, experts, expert_specs={n: spec for n in experts},
                        extractor_config=extractor.config)
    return model.eval(), note


def check_out(out: str | Path, overwrite: bool) -> Path:
    """The bundle folder, links in its parents resolved once; an existing non-empty folder is refused
    unless `overwrite` (then only the bundle's two files in it are replaced)."""
    folder = output_folder(out, "--out")
    check_writable(folder, "--out")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UnsafePathError(f"--out {out} exists and is not empty; pass --overwrite to write the bundle into it")
    return folder


def export(ckpt_dir: str | Path, out: str | Path, overwrite: bool = False) -> str:
    """Write the bundle of checkpoint `ckpt_dir` (a step folder, or a folder whose `latest` names one)."""
    from unirestorer.model.unirestorer import CONFIG
    from unirestorer.train.weights import read_checkpoint

    out = check_out(out, overwrite)
    ckpt = read_checkpoint(ckpt_dir)
    model, note = restorer_from_checkpoint(ckpt)
    model.save_bundle(out)
    config_file = out / CONFIG
    bundle = json.loads(config_file.read_text())  # the file just written
    bundle["source"] = {"checkpoint": str(ckpt.path), "stage": ckpt.client_state.get("stage"), "step": ckpt.step,
                        "note": note}
    bundle["training_config"] = ckpt.client_state.get("config", {})
    atomic_write(config_file, json.dumps(bundle, indent=1))
    return note


def _run(args: argparse.Namespace) -> int:
    from unirestorer.train.checkpoint import CheckpointError

    try:
        note = export(args.ckpt_dir, args.out, args.overwrite)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: export failed: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} from {args.ckpt_dir}: {note}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write an inference bundle from an experts or router checkpoint")
    p.add_argument("ckpt_dir", help="checkpoint folder (step_XXXXXXXX, or the ckpt dir whose `latest` names one)")
    p.add_argument("--out", required=True, help="bundle folder to write (weights.safetensors + bundle.json)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty folder, replacing "
                                                            "the bundle files in it")
    p.set_defaults(func=_run)
