"""Why an image went to the expert it went to: `restore --explain`, its JSON, and the app's panel.

Everything comes from the model's own routing output (`UniRestorer.describe`: level, node, estimated
leaf, the root→leaf path, probabilities) plus what the tree says each node holds; nothing here decides
a route. Keys describe() returns beyond those named below are carried into the JSON and printed as
`key: value`, so a new field of the router shows up without touching this file.
"""

from __future__ import annotations

import json
from typing import Any

KNOWN = ("level", "node", "leaf", "path", "composition", "top_leaves", "p_level")


def pick_node(info: dict, level: int | None = None, node: int | None = None) -> int:
    """The node to run: `node` when given, else the routed path's node at `level`, else the router's choice."""
    if node is not None:
        return node
    return info["node"] if level is None else info["path"][level]


def holds(model, node: int) -> dict[str, Any]:
    """What tree node `node` was fitted on: its level, dominant task and share, the full task counts, and
    the intensity range [min, max] of its dominant task's samples (None: a tree without it, or unknown)."""
    comp = model.tree.composition(node)
    total = sum(comp.values())
    top = max(comp, key=comp.get) if comp else None
    span = model.tree.intensity_range(node, top) if top else None
    return {"level": model.tree.level_of(node), "dominant": top,
            "share": round(comp[top] / total, 3) if top else None, "composition": comp,
            "intensity": list(span) if span else None}


def explanation(model, info: dict, ran: int) -> dict[str, Any]:
    """describe()'s dict, the node that ran, and what every node on the path (and the one that ran) holds."""
    nodes = list(dict.fromkeys([*info["path"], ran]))
    return {**info, "ran": ran, "holds": {str(n): holds(model, n) for n in nodes}}


def node_label(n: int, h: dict) -> str:
    """'2 rain 95% (0.20-0.55)': node id, dominant task, its share of the node's training samples and their
    intensity range (left out where unknown)."""
    if not h["dominant"]:
        return f"{n} (no labelled samples)"
    span = h["intensity"]
    return f"{n} {h['dominant']} {h['share']:.0%}" + (f" ({span[0]:.2f}-{span[1]:.2f})" if span else "")


def explain_text(name: str, exp: dict) -> str:
    """One line per image for the terminal."""
    path = " > ".join(node_label(n, exp["holds"][str(n)]) for n in exp["path"])
    top = ", ".join(f"leaf {k} {p:.2f}" for k, p in exp["top_leaves"].items())
    levels = " ".join(f"{p:.2f}" for p in exp["p_level"])
    ran = "" if exp["ran"] == exp["node"] else f" | ran node {node_label(exp['ran'], exp['holds'][str(exp['ran'])])}"
    extra = "".join(f" | {k}: {json.dumps(v)}" for k, v in exp.items() if k not in (*KNOWN, "ran", "holds"))
    return (f"{name}: level {exp['level']} node {exp['node']} (estimated leaf {exp['leaf']}){ran} | path: {path} "
            f"| top leaves: {top} | p(level): {levels}{extra}")
