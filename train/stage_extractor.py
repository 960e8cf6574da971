"""Stage 1, `extractor`: train the degradation extractor D on shard labels, data parallel.

Loss: family BCE + intensity L1 + supervised contrastive (model/extractor.py). D sees the stored LQ
patches as they are (`data.patch_size`, native resolution, never resized).
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from unirestorer.data_shards.loader import StreamConfig, StreamLoader, make_loader
from unirestorer.launch.env import DistInfo
from unirestorer.model.extractor import DegradationExtractor, extractor_loss, extractor_targets, family_accuracy
from unirestorer.train.config import ConfigError, RunConfig, build_ds_config
from unirestorer.train.stage import warmup_cosine


def build_extractor(cfg: RunConfig) -> DegradationExtractor:
    m = cfg.model
    return DegradationExtractor(m.extractor_backbone, m.embed_dim, m.extractor_proj_dim, m.extractor_crop,
                                m.extractor_crops)


def shard_stream(cfg: RunConfig, info: DistInfo, sources: list[str], batch_size: int, batches: int, restart: int,
                 train: bool = True) -> StreamLoader:
    """The loader of one rank over `sources`; held-out streams have no augmentation and no shuffling."""
    scfg = StreamConfig(sources=sources, weights=(cfg.data.family_weights or None) if train else None,
                        patch=cfg.data.patch_size, batch_size=batch_size,
                        num_workers=cfg.data.num_workers if train else 0,
                        shuffle_buffer=cfg.data.shuffle_buffer if train else 0, batches_per_epoch=batches,
                        seed=cfg.train.seed, augment=train)
    return make_loader(scfg, info.rank, info.world_size, restart=restart)


class ExtractorStage:
    name = "extractor"

    def build(self, cfg: RunConfig, info: DistInfo) -> Any:
        if not cfg.data.train_shards:
            raise ConfigError("stage extractor: data.train_shards is empty")
        self.cfg, self.info = cfg, info
        self.model = build_extractor(cfg)
        t = cfg.train
        opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=opt, lr_scheduler=warmup_cosine(opt, cfg),
                                               config=build_ds_config(cfg, info.device.type))
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        return self.engine

    def stream(self, cfg: RunConfig, info: DistInfo, segment: int) -> StreamLoader:
        return shard_stream(cfg, info, cfg.data.train_shards, self.micro, cfg.data.batches_per_epoch, segment)

    def _input(self, batch: dict) -> torch.Tensor:
        dtype = next(self.engine.module.parameters()).dtype
        return batch["lq"].to(self.info.device, dtype)

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.engine(self._input(batch))
        out = type(out)(*(v.float() for v in out))
        targets = extractor_targets(batch["label"])
        parts = extractor_loss(out, targets)
        metrics = {k: v.item() for k, v in parts.items() if k != "loss"}
        metrics["family_acc"] = family_accuracy(out.family_logits, targets.multi_hot.to(out.family_logits.device))
        return parts["loss"], metrics

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Family accuracy and loss over `log.val_batches` fixed batches per rank of data.val_shards."""
        cfg = self.cfg
        if not cfg.data.val_shards or cfg.log.val_batches <= 0:
            return {}
        module = self.engine.module
        for b in module.buffers():  # BatchNorm running stats drift apart per rank; use rank 0's (as DDP does)
            dist.broadcast(b, 0)
        module.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # correct images, images, loss * images
        try:
            for batch in shard_stream(cfg, self.info, cfg.data.val_shards, self.micro, cfg.log.val_batches, 0,
                                      train=False):
                out = module(self._input(batch))
                out = type(out)(*(v.float() for v in out))
                targets = extractor_targets(batch["label"])
                n = len(batch["label"])
                acc = family_accuracy(out.family_logits, targets.multi_hot.to(out.family_logits.device))
                sums += torch.tensor([acc * n, n, extractor_loss(out, targets)["loss"].item() * n], dtype=torch.float64)
        finally:
            module.train()
        sums = sums.to(self.info.device)
        dist.all_reduce(sums)
        return {"family_acc": (sums[0] / sums[1]).item(), "loss": (sums[2] / sums[1]).item()}


def make_stage() -> ExtractorStage:
    return ExtractorStage()
