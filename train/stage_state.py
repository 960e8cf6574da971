"""What the stages keep in a checkpoint's client state, and how later stages and `export` read it back.

No DeepSpeed here: `export` and the stages share these readers, so there is one way to rebuild the
extractor (from the `extractor_config` every stage stores, weights under `extractor.` except in the
extractor stage's own checkpoint) and one way to rebuild the tree.
"""

from __future__ import annotations

import json
from typing import Any

from unirestorer.model.extractor import DegradationExtractor
from unirestorer.model.tree import DegradationTree
from unirestorer.train.checkpoint import CheckpointError
from unirestorer.train.weights import Checkpoint, load_submodule

EXTRACTOR = "extractor."  # module path of the frozen extractor in the experts and router checkpoints


def tree_to_state(tree: DegradationTree) -> dict[str, Any]:
    meta, tensors = tree.to_state()
    return {"tree_meta": json.dumps(meta), "tree_centroids": tensors["centroids"]}


def tree_from_state(state: dict[str, Any], source: str) -> DegradationTree:
    return DegradationTree.from_state(json.loads(state["tree_meta"]), {"centroids": state["tree_centroids"]}, source)


def extractor_from_checkpoint(ckpt: Checkpoint) -> DegradationExtractor:
    """The trained extractor of any stage's checkpoint, in eval mode."""
    state = ckpt.client_state.get("stage_state", {})
    if "extractor_config" not in state:
        raise CheckpointError(f"{ckpt.path}: no extractor_config in its stage state: not a checkpoint of the "
                              f"extractor, experts or router stage")
    extractor = DegradationExtractor(**json.loads(state["extractor_config"]))
    load_submodule(extractor, ckpt.dense, "" if ckpt.client_state.get("stage") == "extractor" else EXTRACTOR)
    return extractor.eval()
