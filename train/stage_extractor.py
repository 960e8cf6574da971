"""Stage 1, `extractor`: train the degradation extractor D on shard labels, data parallel.

Loss: family BCE + intensity L1 + supervised contrastive (model/extractor.py). D trains on the LQ
patches at their native resolution, and `data.patch_size` must equal `model.extractor_crop`, the crop
size `embed` uses later: an extractor trained on one scale and asked about another does not recognise
noise or blur. With `data.online` every patch is re-degraded with fresh parameters of its own task, so
D cannot memorise a small set of shards. Validation reports exact-match family accuracy per family
and the confusion of single-degradation patches (true family -> most likely family).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from unirestorer.data_shards.loader import StreamConfig, StreamLoader, make_loader
from unirestorer.cuda_setup import optimizer_options
from unirestorer.launch.env import DistInfo
from unirestorer.model.extractor import (DegradationExtractor, confusion_text, extractor_loss, extractor_targets,
                                        family_accuracy)
from unirestorer.train.config import ConfigError, RunConfig, build_ds_config
from unirestorer.train.stage import Metrics, warmup_cosine


def build_extractor(cfg: RunConfig) -> DegradationExtractor:
    m = cfg.model
    return DegradationExtractor(m.extractor_backbone, m.embed_dim, m.extractor_proj_dim, m.extractor_crop,
                                m.extractor_max_crops)


def shard_stream(cfg: RunConfig, info: DistInfo, sources: list[str], batch_size: int, batches: int, restart: int,
                 train: bool = True) -> StreamLoader:
    """The loader of one rank over `sources`; held-out streams are stored patches, unshuffled, unaugmented."""
    scfg = StreamConfig(sources=sources, weights=(cfg.data.family_weights or None) if train else None,
                        patch=cfg.data.patch_size, batch_size=batch_size,
                        num_workers=cfg.data.num_workers if train else 0,
                        shuffle_buffer=cfg.data.shuffle_buffer if train else 0, batches_per_epoch=batches,
                        seed=cfg.train.seed, augment=train, online=cfg.data.online and train)
    return make_loader(scfg, info.rank, info.world_size, restart=restart)


class ExtractorStage:
    name = "extractor"

    def build(self, cfg: RunConfig, info: DistInfo) -> Any:
        if not cfg.data.train_shards:
            raise ConfigError("stage extractor: data.train_shards is empty")
        if cfg.data.patch_size != cfg.model.extractor_crop:
            raise ConfigError(f"stage extractor: data.patch_size={cfg.data.patch_size} but model.extractor_crop="
                              f"{cfg.model.extractor_crop}; the extractor must train at the crop size it embeds with "
                              f"(set both to the same value)")
        self.cfg, self.info = cfg, info
        self.model = build_extractor(cfg)
        self.families = self.model.families
        t = cfg.train
        opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                **optimizer_options(info.device))
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=opt, lr_scheduler=warmup_cosine(opt, cfg),
                                               config=build_ds_config(cfg, info.device.type))
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        return self.engine

    def stream(self, cfg: RunConfig, info: DistInfo, segment: int) -> StreamLoader:
        return shard_stream(cfg, info, cfg.data.train_shards, self.micro, cfg.data.batches_per_epoch, segment)

    def _input(self, batch: dict) -> torch.Tensor:
        dtype = next(self.engine.module.parameters()).dtype
        return batch["lq"].to(self.info.device, dtype, non_blocking=True)

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, Metrics]:
        out = self.engine(self._input(batch))
        out = type(out)(*(v.float() for v in out))
        targets = extractor_targets(batch["label"], families=self.families)
        parts = extractor_loss(out, targets)
        logits, truth = out.family_logits.detach(), targets.multi_hot.to(out.family_logits.device)
        detached = {k: v.detach() for k, v in parts.items() if k != "loss"}
        return parts["loss"], lambda: {**{k: v.item() for k, v in detached.items()},
                                       "family_acc": family_accuracy(logits, truth)}

    def state(self) -> dict[str, Any]:
        return {"extractor_config": json.dumps(self.model.config)}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Exact-match family accuracy (all and per family), loss and confusion over `log.val_batches` fixed
        batches per rank of data.val_shards."""
        cfg, n_fam = self.cfg, len(self.families)
        if not cfg.data.val_shards or cfg.log.val_batches <= 0:
            return {}
        module = self.engine.module
        for b in module.buffers():  # BatchNorm running stats drift apart per rank; use rank 0's (as DDP does)
            dist.broadcast(b, 0)
        module.eval()
        # exact-match hits, images, loss * images; per family: hits and images having it; confusion matrix
        sums = torch.zeros(3 + 2 * n_fam + n_fam * n_fam, dtype=torch.float64)
        try:
            for batch in shard_stream(cfg, self.info, cfg.data.val_shards, self.micro, cfg.log.val_batches, 0,
                                      train=False):
                out = module(self._input(batch))
                out = type(out)(*(v.float() for v in out))
                targets = extractor_targets(batch["label"], families=self.families)
                truth = targets.multi_hot.double()
                hit = ((out.family_logits > 0).cpu() == truth.bool()).all(1).double()
                sums[:3] += torch.tensor([hit.sum(), len(hit), extractor_loss(out, targets)["loss"].item() * len(hit)])
                sums[3:3 + n_fam] += (hit[:, None] * truth).sum(0)
                sums[3 + n_fam:3 + 2 * n_fam] += truth.sum(0)
                single = truth.sum(1) == 1
                pairs = truth[single].argmax(1) * n_fam + out.family_logits.cpu()[single].argmax(1)
                sums[3 + 2 * n_fam:] += torch.bincount(pairs, minlength=n_fam * n_fam).double()
        finally:
            module.train()
        sums = sums.to(self.info.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
        hits, counts = sums[3:3 + n_fam], sums[3 + n_fam:3 + 2 * n_fam]
        images = sums[1].clamp_min(1)
        out = {"family_acc": float(sums[0] / images), "loss": float(sums[2] / images)}
        out |= {f"family_acc/{f}": float(hits[i] / counts[i]) for i, f in enumerate(self.families) if counts[i] > 0}
        confusion = sums[3 + 2 * n_fam:].view(n_fam, n_fam)
        if self.info.rank == 0:
            print(f"[extractor] step {step} validation: {json.dumps({k: round(v, 3) for k, v in out.items()})}\n"
                  f"confusion of single-degradation patches (rows: truth, columns: top family):\n"
                  f"{confusion_text(confusion, self.families)}", file=sys.stderr, flush=True)
        return out


def make_stage() -> ExtractorStage:
    return ExtractorStage()
