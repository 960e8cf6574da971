"""The demo's table: every method on the held-out crops per task, and the shift section (clean, mild, camera
noise and the families never trained, on the same crops) with its harm rate."""

from __future__ import annotations

from pathlib import Path

from unirestorer.safe_files import atomic_write

def evaluate_tasks(model, heldout: dict[str, list], out: Path, device: str) -> tuple[dict[str, list], dict, str]:
    """Routed model, baselines and the classical floor per task on the held-out samples (out/results.md, CSVs,
    grids); the extractor's exact-match family accuracy on the single-degradation ones, and their confusion
    (true family -> the family with the highest logit) as text."""
    import torch

    from unirestorer.model.extractor import confusion_text

    from unirestorer.evaluate import evaluate, markdown, write_csv, write_grid
    from unirestorer.metrics import Convention
    conv, records, sections = Convention(), {}, []
    out.mkdir(parents=True, exist_ok=True)
    hits: dict[str, list[bool]] = {}
    families = model.extractor.families
    confusion = torch.zeros(len(families), len(families), dtype=torch.long)
    for task, samples in heldout.items():
        recs, outputs = evaluate(model, samples, conv, device=device, progress=False, set_task=task)
        records[task] = recs
        sections.append(markdown(f"{task}: {out.parent / 'heldout' / task}", conv, recs, model.tree.n_levels, task))
        write_csv(out / f"{task}.csv", recs)
        write_grid(out / f"{task}_grid.png", samples, recs, outputs)
        if task in families:
            with torch.no_grad():
                for s in samples:  # the image's family logits: the heads on its (crop-averaged) embedding
                    e = model.extractor.embed(torch.from_numpy(s.lq).permute(2, 0, 1)[None].to(device))
                    logits = model.extractor.family_head(e)[0]
                    hits.setdefault(task, []).append(bool(((logits > 0) == torch.tensor(
                        [f == task for f in families], device=logits.device)).all()))
                    confusion[families.index(task), int(logits.argmax())] += 1
    atomic_write(out / "results.md", "\n".join(sections))
    per_family = {f: sum(v) / len(v) for f, v in hits.items()}
    every = [h for v in hits.values() for h in v]
    return (records, {"family_accuracy": sum(every) / len(every) if every else None, "per_family": per_family},
            confusion_text(confusion, families))


def summary(records: dict[str, list], extractor: dict, tree_stats: dict, seconds: float) -> dict:
    """summary.json: mean PSNR per task and method, their mean over tasks, extractor accuracy, tree purity."""
    import numpy as np

    from unirestorer.evaluate import METHODS, summarise

    tasks = {}
    for task, recs in records.items():
        s = summarise(recs)
        tasks[task] = {"n": len(recs), **{m: s[m]["psnr"] for m in METHODS}}
    mean = {m: (None if any(t[m] is None for t in tasks.values()) else float(np.mean([t[m] for t in tasks.values()])))
            for m in METHODS}
    return {"tasks": tasks, "mean": mean, "extractor": extractor,
            "tree": {"leaf_purity": tree_stats.get("leaf_purity"), "level1_purity": tree_stats.get("level1_purity")},
            "seconds": round(seconds, 1)}


def summary_table(doc: dict, levels: dict[str, list[int]]) -> str:
    """One row per task (mean PSNR of every method) and their mean, with the routed level counts."""
    from unirestorer.evaluate import METHODS, cell

    head = "| task | n | " + " | ".join(METHODS) + " | images routed to level 0/1/2 |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for task, row in doc["tasks"].items():
        cells = " | ".join(cell(row[m]) for m in METHODS)
        lines.append(f"| {task} | {row['n']} | {cells} | {'/'.join(map(str, levels[task]))} |")
    lines.append(f"| **mean** | {sum(r['n'] for r in doc['tasks'].values())} | "
                 f"{' | '.join(cell(doc['mean'][m]) for m in METHODS)} | |")
    ex, tree = doc["extractor"], doc["tree"]
    acc = "—" if ex["family_accuracy"] is None else f"{ex['family_accuracy']:.3f}"
    lines += ["", f"Extractor exact-match family accuracy on the held-out single-degradation crops: {acc} "
              f"({', '.join(f'{f} {a:.2f}' for f, a in ex['per_family'].items())}). Tree purity: level 1 "
              f"{tree['level1_purity']}, leaves {tree['leaf_purity']}."]
    if doc.get("shifts"):
        lines += ["", "Shifted data (never trained on) on the same held-out crops: clean = as they are, mild = each family "
                  "below its training range, camera_noise = camera noise of another pipeline than the trained one, "
                  "unseen_family = the library's families no trained task holds (JPEG, snow for the default tasks); "
                  "router = the router's own level, routed = after the fallback checks (support, clean, calibration); "
                  "PSNR capped at 50 dB:", "",
                  shift_table(doc["shifts"])]
    return "\n".join(lines)




SHIFT_KEYS = ("n", "input", "classical", "root", "leaf", "router", "routed", "oracle", "harm_rate", "levels")


def evaluate_shifts(model, clean: Path, out: Path, device: str) -> dict[str, dict]:
    """The held-out clean crops as they are, with mild degradations, with camera noise of a pipeline never
    trained on and with the library's families the bundle never trained (JPEG and snow for the demo; left out
    where it trained them all), unirestorer/shifts.py: per set the mean PSNR of every method, the harm rate, the
    level counts."""
    import numpy as np

    from unirestorer.evaluate import write_grid
    from unirestorer.image_io import load_picture
    from unirestorer.shifts import (MILD, by_range, camera, identity, run_set, set_row, synthetic_set,
                                    unseen_families, unseen_family)

    pool = [(p.stem, load_picture(p).rgb) for p in sorted(clean.glob("*.png"))]
    sets = [("clean", identity), ("mild", by_range(MILD)), ("camera_noise", camera)]
    if unseen := unseen_families(model.tree.task_names):
        sets.append(("unseen_family", unseen_family(unseen)))
    rows = {}
    for name, degrade in sets:
        shift = synthetic_set(name, pool, len(pool), 0, 0, degrade)
        records, outputs = run_set(model, shift, "auto", device)
        row = set_row(records, model.tree.n_levels)
        rows[name] = {k: row[k] for k in SHIFT_KEYS}
        worst = np.argsort([r["routed_psnr"] - r["input_psnr"] for r in records], kind="stable")[:3]
        write_grid(out / f"shift_{name}_grid.png", [shift.samples[i] for i in worst], [records[i] for i in worst],
                   [outputs[i] for i in worst])
    return rows


def shift_table(shifts: dict[str, dict]) -> str:
    """The shift section: one row per set, with the harm rate (routed < input - 0.5 dB)."""
    from unirestorer.evaluate import cell
    from unirestorer.shifts import COLUMNS, harm_cell

    head = "| shift | n | " + " | ".join(COLUMNS) + " | harm | images routed to level 0/1/2 |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in shifts.items():
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cell(r[c]) for c in COLUMNS) +
                     f" | {harm_cell(r['harm_rate'], r['n'])} | {'/'.join(map(str, r['levels']))} |")
    return "\n".join(lines)
