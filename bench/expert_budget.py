"""Short of training, or short of capacity? `python bench/expert_budget.py RUN --node N --task T [--steps 1000]`

A learned expert that loses to its classical floor (BM3D, the dark channel prior) or to its input is a bug to
find. This benchmark tells budget from capacity: it takes one expert of a trained run's bundle and trains it on,
alone, on fresh crops of one task made from the run's training photos, with the experts stage's loss (PSNR, floored
as that stage floors the node's level), and scores it on the run's held-out crops of that task every `--every`
steps. If the curve climbs past the floor the network can do it and the run gave it too few images; if it
flattens below, it cannot at this size.

RUN is a demo run folder (`unirestorer demo` writes it): RUN/bundle, RUN/photos/train, RUN/heldout/{TASK,clean}
and RUN/eval/summary.json (the run's own input / classical / leaf / routed / oracle on the same crops, printed
beside the curve). The expert is scored on every held-out crop of the task, whatever the router would do with it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unirestorer.data_shards.degradations import synthesize
from unirestorer.evaluate import load_pairs
from unirestorer.image_io import load_picture
from unirestorer.model.router import LEVEL_PSNR_CAP, image_psnr
from unirestorer.model.unirestorer import UniRestorer

with contextlib.redirect_stdout(sys.stderr):  # the experts stage imports deepspeed, which logs to stdout (--json)
    from unirestorer.train.stage_experts import PSNR_LOSS_FLOORS


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def crops(photos: list[np.ndarray], task: str, patch: int, batch: int, rng: np.random.Generator):
    """A batch of (degraded, clean) random crops, each with fresh degradation parameters of `task`."""
    lq, gt = [], []
    for _ in range(batch):
        photo = photos[rng.integers(len(photos))]
        y, x = rng.integers(photo.shape[0] - patch + 1), rng.integers(photo.shape[1] - patch + 1)
        clean = np.ascontiguousarray(photo[y : y + patch, x : x + patch])
        lq.append(np.ascontiguousarray(synthesize(clean, task, rng)[0]))
        gt.append(clean)
    return to_tensor(lq), to_tensor(gt)


@torch.no_grad()
def score(net: torch.nn.Module, lq: torch.Tensor, gt: torch.Tensor) -> float:
    net.eval()
    out = torch.cat([net(lq[i : i + 8]).clamp(0, 1) for i in range(0, len(lq), 8)])
    net.train()
    return float(image_psnr(out, gt).clamp(max=LEVEL_PSNR_CAP).mean())


def curve(model: UniRestorer, node: int, run: Path, task: str, steps: int, every: int, batch: int, lr: float,
          patch: int, seed: int) -> list[dict]:
    for folder in (run / "heldout" / task, run / "heldout" / "clean", run / "photos" / "train"):
        if not folder.is_dir():
            raise SystemExit(f"{folder}: not found (no held-out {task} crops, their clean originals or training photos)")
    heldout = load_pairs(run / "heldout" / task, run / "heldout" / "clean")
    photos = [load_picture(p).rgb for p in sorted((run / "photos" / "train").iterdir())]
    photos = [p for p in photos if min(p.shape[:2]) >= patch]
    if not photos:
        raise SystemExit(f"{run / 'photos' / 'train'}: no training photo of at least {patch} px")
    lq, gt = to_tensor([s.lq for s in heldout]), to_tensor([s.gt for s in heldout])
    floor = PSNR_LOSS_FLOORS[min(model.tree.level_of(node), 1)]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = copy.deepcopy(model.expert(node)).float().train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, lr * 1e-3)
    rows = [{"step": 0, "images": 0, "psnr": score(net, lq, gt), "seconds": 0.0}]
    start = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc=f"node {node} on {task}", unit="step", file=sys.stderr):
        x, y = crops(photos, task, patch, batch, rng)
        loss = (10 * torch.log10((net(x) - y).pow(2).flatten(1).mean(1) + floor)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == steps:
            rows.append({"step": step, "images": step * batch, "psnr": score(net, lq, gt),
                         "seconds": round(time.perf_counter() - start, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a demo run folder (bundle/, photos/train/, heldout/, eval/summary.json)")
    ap.add_argument("--node", type=int, action="append", required=True, help="tree node id (repeatable)")
    ap.add_argument("--task", required=True, help="the task the node is trained and scored on, e.g. noise")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak LR (the demo's level LR), cosine to 1/1000 of it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = UniRestorer.load_bundle(args.run / "bundle").eval()
    trained = json.loads((args.run / "bundle" / "bundle.json").read_text()).get("training_config") or {}
    patch = int(trained.get("data", {}).get("patch_size", 64))
    summary_path = args.run / "eval" / "summary.json"
    reference = json.loads(summary_path.read_text())["tasks"].get(args.task, {}) if summary_path.is_file() else {}
    for node in args.node:
        if not 0 <= node < model.tree.n_nodes:
            raise SystemExit(f"--node {node}: the tree has nodes 0..{model.tree.n_nodes - 1}")
    result = {"run": str(args.run), "task": args.task, "batch": args.batch, "lr": args.lr, "patch": patch,
              "reference": reference,
              "nodes": {str(n): curve(model, n, args.run, args.task, args.steps, args.every, args.batch, args.lr,
                                      patch, args.seed) for n in args.node}}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    ref = " · ".join(f"{k} {reference[k]:.2f}" for k in ("input", "classical", "leaf", "routed", "oracle")
                     if isinstance(reference.get(k), (int, float)))
    print(f"{args.task} on {args.run}: the run's own table on these crops: {ref or '(no eval/summary.json)'}")
    print("| node | steps | images | held-out PSNR | seconds |\n|---|---|---|---|---|")
    for node, rows in result["nodes"].items():
        for r in rows:
            print(f"| {node} | {r['step']} | {r['images']} | {r['psnr']:.2f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
