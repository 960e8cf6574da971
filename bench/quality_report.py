"""The quality benchmark's table and goals, from the results document bench/quality.py builds."""

from __future__ import annotations

import numpy as np

MIXED = "mixed/unseen"  # the group of test sets with a mixture or a shift; the others are "single"
ROWS = {  # row id -> (what the table calls it, the model it comes from, its cost's source)
    "input": ("Input (no restoration)", "tree", None),
    "classical": ("Classical floor", "tree", None),
    "tree": ("**UniRestorer tree, routed**", "tree", "tree"),
    "tree_root": ("tree: root expert only", "tree", None),
    "tree_leaf": ("tree: estimated leaf only (no granularity)", "tree", None),
    "tree_oracle": ("tree: oracle node on the path (needs GT)", "tree", None),
    "dense_inference": ("dense expert, equal inference cost", "dense_inference", "dense_inference"),
    "dense_compute": ("dense expert, equal training compute", "dense_compute", "dense_compute"),
    "lora": ("LoRA tree (rank 8), routed", "lora", "lora"),
}
METHOD_OF = {"input": "input", "classical": "classical", "tree": "routed", "tree_root": "root", "tree_leaf": "leaf",
             "tree_oracle": "oracle", "dense_inference": "root", "dense_compute": "root", "lora": "routed"}
CONVENTION = ("PSNR (dB) / SSIM, RGB, float (no rounding), centre crop to a multiple of 16 (the PromptIR "
              "convention; CBSD68 noise added to the uint8 image with seed 0 and stored as uint8), scikit-image "
              "metrics, mean over images")


def row_values(model: str) -> list[tuple[str, str]]:
    """(row id, evaluate() method) of the rows a model's evaluation fills; a dense bundle's router is fresh,
    so its root column is the dense expert."""
    return [(row, METHOD_OF[row]) for row, (_, source, _) in ROWS.items() if source == model]


def mean_psnr(doc: dict, row: str, group: str | None = None) -> float | None:
    values = [r[row]["psnr"] for name, r in doc["results"].items()
              if group is None or doc["sets"][name]["group"] == group]
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def goals(doc: dict) -> list[dict]:
    """The issue's goals, each measured on this run: margin >= 0 is met."""
    mixed = MIXED
    r25 = next(rows for name, rows in doc["results"].items() if name.startswith("CBSD68 σ25"))
    costs = doc["costs"]
    share = costs["lora"]["expert_params"] / max(costs["tree"]["expert_params"], 1)

    def compare(goal: str, a: float, b: float, offset: float, note: str = "") -> dict:
        return {"goal": goal, "measured": f"{a:.2f} vs {b:.2f}{note}", "margin": round(a - b - offset, 3),
                "met": bool(a - b - offset >= 0)}

    tree = mean_psnr(doc, "tree")
    return [
        compare("tree routed ≥ dense of equal inference cost + 1.0 dB (mean)", tree,
                mean_psnr(doc, "dense_inference"), 1.0),
        compare("tree routed ≥ dense of equal training compute (mean)", tree, mean_psnr(doc, "dense_compute"), 0.0),
        compare("mixed/unseen sets: granularity routing ≥ leaf-only", mean_psnr(doc, "tree", mixed),
                mean_psnr(doc, "tree_leaf", mixed), 0.0),
        compare("LoRA tree within 0.5 dB of the full tree (mean)", mean_psnr(doc, "lora"), tree, -0.5,
                f", {share:.1%} of its expert parameters"),
        compare("CBSD68 σ25: routed within 0.5 dB of the classical floor", r25["tree"]["psnr"],
                r25["classical"]["psnr"], -0.5),
    ]


def _cell(value: dict) -> str:
    return "—" if value["psnr"] is None else f"{value['psnr']:.2f} / {value['ssim']:.3f}"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown(doc: dict) -> str:
    sets = list(doc["results"])
    head = (["model", *sets, "mean", "mean mixed/unseen", "expert image-passes", "train wall (s)",
             "bundle MB (expert params)"])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row, (title, _, cost) in ROWS.items():
        cells = [_cell(doc["results"][s][row]) for s in sets]
        extra = ["", "", ""]
        if cost:
            c = doc["costs"][cost]
            extra = [f"{c['image_passes']:,}", f"{c['train_seconds']:.0f}",
                     f"{c['bundle_bytes'] / 2**20:.2f} ({c['expert_params']:,})"]
        means = [_num(mean_psnr(doc, row)), _num(mean_psnr(doc, row, MIXED))]
        lines.append("| " + " | ".join([title, *cells, *means, *extra]) + " |")
    n = ", ".join(f"{s} {v['n']}" for s, v in doc["sets"].items())
    mixed = ", ".join(s for s, v in doc["sets"].items() if v["group"] == MIXED)
    notes = [
        "", f"{CONVENTION}. Images per set (the first, by name): {n}. Mixed/unseen sets: {mixed}. Classical floor: "
        f"{doc['classical']}; '—' where a set has none. Means are over PSNR.",
        "Expert image-passes: images through trained experts in the experts stage (fwd + bwd), as the checkpoints "
        "counted them. Train wall: the model's own runs (tree: extractor + cluster + experts + router; dense: its "
        "root-only tree + experts; LoRA tree: experts + router, on the tree's extractor and tree). Bundle: "
        "weights.safetensors (with the extractor and router), expert parameters stored in it.",
        f"Steps per run: {', '.join(f'{k} {v}' for k, v in doc['steps'].items() if v)}. Experts-stage overrides: "
        f"{', '.join(doc['experts_overrides']) or 'none (the main job recipe)'}. Total wall "
        f"{doc['seconds'] / 60:.1f} min.", "", "| goal | measured | margin (dB) | |", "|---|---|---|---|"]
    notes += [f"| {g['goal']} | {g['measured']} | {g['margin']:+.2f} | {'met' if g['met'] else '**missed**'} |"
              for g in doc["goals"]]
    return "\n".join(lines + notes)
