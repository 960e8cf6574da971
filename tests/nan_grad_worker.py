"""The training spine with a plain fp32 DeepSpeed engine (ZeRO stage 0, as the router stage runs) whose loss
is finite but whose gradients are NaN: sqrt(0 * y) is 0, its gradient inf * 0. Run by
tests/test_adversarial_train.py; prints one JSON line with the exit code and whether the weights stayed finite.

    python tests/nan_grad_worker.py --ckpt-dir DIR --log-dir DIR [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys

import deepspeed
import torch

from unirestorer.launch.env import init_distributed
from unirestorer.train.config import add_common_args, build_ds_config, config_from_args
from unirestorer.train.loop import run


class NanGradStage:
    name = "nan_grad"

    def build(self, cfg, info):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg, "cpu"))
        return self.engine

    def stream(self, cfg, info, segment):
        return [{"x": torch.ones(2, 4)}]

    def forward(self, batch, step):
        y = self.engine(batch["x"])
        return torch.sqrt(0.0 * y.abs()).sum(), {}

    def state(self):
        return {}

    def load_state(self, state):
        pass

    def validate(self, step):
        return {}


def main() -> None:
    cfg = config_from_args(add_common_args(argparse.ArgumentParser()).parse_args())
    info = init_distributed(timeout_s=60)
    stage = NanGradStage()
    code = run(stage, cfg, info)
    weights = torch.cat([p.detach().flatten() for p in stage.engine.module.parameters()])
    print(json.dumps({"code": code, "finite": bool(torch.isfinite(weights).all())}), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
