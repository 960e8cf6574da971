"""One rank of a 2-rank TreeMoE forward (levels [1, 2], ep [1, 2], real deepspeed.initialize, gloo) in which
rank 1 routes an image to a node the tree does not have: it raises in TreeMoE.forward while rank 0 is
already inside the exchange with it. Errors are handled as the training CLI handles them (train/__main__.py:
FailFast.fail, then exit), so the test sees what a training run would. Run by tests/test_adversarial_train.py:

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/fail_fast_worker.py
"""

from __future__ import annotations

import sys

import torch

from unirestorer.launch.env import init_distributed
from unirestorer.train.fail_fast import FailFast


def main() -> int:
    info = init_distributed()  # the default 30 min process-group timeout: the guard must not need it
    guard = FailFast(info.rank, info.world_size).start()
    try:
        from unirestorer.model.experts import create_expert
        from unirestorer.parallel.tree_moe import TreeMoE, initialize

        torch.manual_seed(0)
        layer = TreeMoE(lambda node: create_expert("nafnet", "tiny"), [1, 2], [1, 2])
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
        engine = initialize(layer, config, lambda groups: torch.optim.SGD(groups, lr=0.1))
        nodes = torch.tensor([[1], [2]]) if info.rank == 0 else torch.tensor([[1], [9]])
        with torch.no_grad():
            engine(torch.rand(2, 3, 16, 16), nodes)
        print(f"[rank {info.rank}] forward finished", flush=True)
        return 0
    except ValueError as err:
        return guard.fail(2, f"[rank {info.rank}] error: {err}")
    finally:
        guard.stop()


if __name__ == "__main__":
    sys.exit(main())
