"""Degradation extractor D: image -> embedding that separates degradation type and intensity.

The paper re-trains a DA-CLIP controller; CLIP weights cannot be downloaded here, so D is a timm
backbone trained from scratch on the labels our shards carry. It only ever sees native-resolution
crops (resizing erases noise); at inference it averages the embeddings of several seeded crops.
Heads on the embedding: family logits (multi-label: mixtures have several), per-family intensity
in [0, 1], and a normalised projection for a supervised contrastive loss over (type, intensity bin).
The family list is part of the extractor's config, so a bundle keeps the families it was trained on
when the synthesis gains new ones.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from unirestorer.data_shards.degradations import FAMILIES


class ExtractorOutput(NamedTuple):
    embedding: torch.Tensor  # [B, D]: what the tree clusters and the router reads
    family_logits: torch.Tensor  # [B, n_families], multi-label
    intensity: torch.Tensor  # [B, n_families] in [0, 1]
    projection: torch.Tensor  # [B, P], unit norm, for the contrastive loss only


class ExtractorTargets(NamedTuple):
    multi_hot: torch.Tensor  # [B, n_families] float 0/1
    intensity: torch.Tensor  # [B, n_families] float, 0 where unknown
    mask: torch.Tensor  # [B, n_families] float 1 where the intensity is known
    class_ids: torch.Tensor  # [B] int64: same id <=> same set of (type, intensity bin)


class DegradationExtractor(nn.Module):
    def __init__(
        self, backbone: str = "resnet10t", embed_dim: int = 256, proj_dim: int = 128, crop: int = 64,
        max_crops: int = 16, families: Sequence[str] = FAMILIES,
    ) -> None:
        super().__init__()
        self.families = list(families)
        self.config = dict(backbone=backbone, embed_dim=embed_dim, proj_dim=proj_dim, crop=crop, max_crops=max_crops,
                           families=self.families)
        self.crop, self.max_crops = crop, max_crops
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        self.embed_head = nn.Linear(self.backbone.num_features, embed_dim)
        self.family_head = nn.Linear(embed_dim, len(self.families))
        self.intensity_head = nn.Linear(embed_dim, len(self.families))
        self.projection = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, proj_dim))

    def forward(self, x: torch.Tensor) -> ExtractorOutput:
        """x: B x 3 x h x w crops in [0, 1] (already cropped: no resizing happens here)."""
        e = self.embed_head(self.backbone(x - 0.5))
        return ExtractorOutput(
            e, self.family_head(e), self.intensity_head(e).sigmoid(), F.normalize(self.projection(e), dim=-1)
        )

    @torch.no_grad()
    def embed(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Images (B x 3 x H x W, or a list of 3 x H x W of any sizes) -> B x D, in eval mode.

        Each image's embedding is the mean over native-resolution crops of the training crop size laid
        on an even grid over the whole image, about one per crop area and at most `max_crops`: a
        function of the image alone (not of its batch), and it sees all of a small image.
        """
        dtype = next(self.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"the extractor's weights are {dtype}: routing needs them in fp32 (call .float() after "
                             f"anything that casts the whole model, e.g. DeepSpeed's bf16 mode)")
        was_training = self.training
        self.eval()
        device = (images if isinstance(images, torch.Tensor) else images[0]).device.type
        try:
            with torch.autocast(device, enabled=False):  # routing runs in fp32 (bf16 picks other tree nodes)
                if isinstance(images, torch.Tensor):
                    if images.dim() != 4 or images.shape[1] != 3:
                        raise ValueError(f"embed expects B x 3 x H x W images, got shape {tuple(images.shape)}")
                    return self._embed_same_size(images.float())
                return torch.cat([self._embed_same_size(img.unsqueeze(0).float()) for img in images])
        finally:
            self.train(was_training)

    def _embed_same_size(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        ch, cw = min(self.crop, h), min(self.crop, w)
        ys, xs = crop_grid(h, ch, w, cw, self.max_crops)
        crops = torch.cat([images[:, :, y : y + ch, x : x + cw] for y in ys for x in xs])  # [n*B, 3, ch, cw]
        return self(crops).embedding.view(len(ys) * len(xs), images.shape[0], -1).mean(0)


def crop_grid(h: int, ch: int, w: int, cw: int, max_crops: int) -> tuple[list[int], list[int]]:
    """Row and column offsets of an even grid of about (h/ch) x (w/cw) crops, at most max_crops in all."""
    ny, nx = max(1, round(h / ch)), max(1, round(w / cw))
    while ny * nx > max_crops:
        if ny >= nx:
            ny -= 1
        else:
            nx -= 1
    spread = lambda size, c, n: [round(i * (size - c) / (n - 1)) for i in range(n)] if n > 1 else [(size - c) // 2]  # noqa: E731
    return spread(h, ch, ny), spread(w, cw, nx)


def _intensity_bin(intensity: float | None, n_bins: int) -> str:
    return "na" if intensity is None else str(min(int(intensity * n_bins), n_bins - 1))


def extractor_targets(labels: list[dict], n_bins: int = 3, families: Sequence[str] = FAMILIES) -> ExtractorTargets:
    """Shard labels -> training targets. Real pairs may have intensity None: masked, binned as 'na'."""
    n, families = len(labels), list(families)
    multi_hot, intensity, mask = (torch.zeros(n, len(families)) for _ in range(3))
    class_ids = torch.zeros(n, dtype=torch.int64)
    for i, label in enumerate(labels):
        keys = []
        for comp in label.get("components", []):
            if comp.get("family") not in families:
                raise ValueError(f"label {i}: unknown degradation family {comp.get('family')!r}; this extractor "
                                 f"knows {families}")
            f = families.index(comp["family"])
            multi_hot[i, f] = 1.0
            if comp.get("intensity") is not None:
                intensity[i, f] = max(intensity[i, f].item(), float(comp["intensity"]))
                mask[i, f] = 1.0
            keys.append(f"{comp.get('type', comp['family'])}@{_intensity_bin(comp.get('intensity'), n_bins)}")
        key = "+".join(sorted(keys)) or "clean"
        class_ids[i] = zlib.crc32(key.encode())  # stable across batches, ranks and runs
    return ExtractorTargets(multi_hot, intensity, mask, class_ids)


def supervised_contrastive(z: torch.Tensor, class_ids: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) on unit vectors z [B, P]; anchors without a positive are skipped."""
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positives = (class_ids[:, None] == class_ids[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return sim.sum() * 0.0
    mean_log_prob = (log_prob * positives).sum(1)[has_pos] / n_pos[has_pos]
    return -mean_log_prob.mean()


def extractor_loss(
    out: ExtractorOutput, targets: ExtractorTargets, intensity_weight: float = 1.0, contrastive_weight: float = 1.0,
    temperature: float = 0.1,
) -> dict[str, torch.Tensor]:
    """BCE on families + masked L1 on intensity + supervised contrastive on the projection."""
    t = ExtractorTargets(*(v.to(out.embedding.device) for v in targets))
    family = F.binary_cross_entropy_with_logits(out.family_logits, t.multi_hot)
    intensity = (F.l1_loss(out.intensity, t.intensity, reduction="none") * t.mask).sum() / t.mask.sum().clamp_min(1)
    contrastive = supervised_contrastive(out.projection, t.class_ids, temperature)
    loss = family + intensity_weight * intensity + contrastive_weight * contrastive
    return {"loss": loss, "family": family, "intensity": intensity, "contrastive": contrastive}


@torch.no_grad()
def family_accuracy(family_logits: torch.Tensor, multi_hot: torch.Tensor) -> float:
    """Share of images whose predicted family set (sigmoid > 0.5) is exactly the true set."""
    return ((family_logits > 0) == multi_hot.bool()).all(dim=1).float().mean().item()


def confusion_text(confusion: torch.Tensor, families: list[str]) -> str:
    """Rows: true family of single-degradation patches; columns: the family with the highest logit."""
    width = max(len(f) for f in families) + 1
    lines = [" " * width + " ".join(f"{f[:6]:>6}" for f in families)]
    for f, row in zip(families, confusion.long().tolist()):
        if sum(row):
            lines.append(f"{f:<{width}}" + " ".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
