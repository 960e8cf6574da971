"""What a run reports: TensorBoard scalars, one-line JSON logs, a tqdm bar with ETA (all on rank 0).

JSON lines go to stdout (prefixed `[metrics] `, for `grep`) and to `log.dir/metrics.jsonl` (appended across
resumes, so a resumed run's lines follow the interrupted run's; the last line of a step wins).
Scalars are averaged over ranks by the caller before they get here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class Monitor:
    def __init__(self, log_dir: str | Path, rank: int, start_step: int, max_steps: int, stage: str) -> None:
        self.rank, self.stage = rank, stage
        self.writer = self.bar = self.jsonl = None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter  # heavy; rank 0 only

        root = Path(log_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(root / "tb"), purge_step=start_step or None)
        self.jsonl = open(root / "metrics.jsonl", "a", buffering=1)
        self.bar = tqdm(total=max_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """TensorBoard `stage/prefix/name` scalars and one JSON line `{"step", "stage", prefix/name...}`."""
        if self.rank != 0:
            return
        line: dict[str, Any] = {"step": step, "stage": self.stage, "time": round(time.time(), 3)}
        for name, value in values.items():
            self.writer.add_scalar(f"{self.stage}/{prefix}/{name}", value, step)
            line[f"{prefix}/{name}"] = value if math.isfinite(value) else str(value)
        text = json.dumps(line)
        self.jsonl.write(text + "\n")
        self.bar.write(f"[metrics] {text}", file=sys.stdout)
        sys.stdout.flush()

    def images(self, step: int, images: dict[str, Any], prefix: str = "val_images") -> None:
        """CHW float images in [0, 1] as TensorBoard images `stage/prefix/tag`."""
        if self.rank == 0:
            for tag, image in images.items():
                self.writer.add_image(f"{self.stage}/{prefix}/{tag}", image, step)

    def advance(self, step: int, postfix: dict[str, float] | None = None) -> None:
        if self.rank == 0:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(step - self.bar.n)

    def note(self, text: str) -> None:
        """A human message (rank 0), printed without breaking the bar."""
        if self.rank == 0:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
            self.bar = None
