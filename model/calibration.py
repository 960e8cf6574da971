"""Local calibration: has a node's expert helped images like this one? (issue 18, do no harm)

The support check asks whether an image lies where a node's training images lie. It cannot see that a
node's expert harms part of what lies there: a haze type node holds bright, low-contrast clean photos beside
thin haze, and its expert re-exposes both (kodim10: 50 → 15.5 dB). The calibration bank records, for stored
training samples, their embedding, their tree path and the PSNR of every expert on that path against the
ground truth (`measure`). For a new image its `k` nearest bank samples vote, level by level down its path:
a node keeps the image only where at least `min_members` of those neighbours went through it, their mean
gain over the node kept so far (the parent, or the parent's kept ancestor where the parent was refused) is
not negative, and at most `harm_share` of them it harmed: left more than HARM_DB below both the node kept before it
and the root, the generic expert falling back gives. A leaf that loses to its type only on images the type had
already restored well, and stays above the root on them, harms no one: the seed-1 demo's low-light leaf gains +3 to
+12 dB over its type on its darker neighbours and loses up to 9 dB on milder ones the type had taken to 17–22 dB,
and was refused on those alone (demo low light 14.59 → 15.60 dB, BENCHMARKS.md "fifteenth session"). A refused
node does not bar its children: a type node that learned to leave its images nearly alone (0 to -0.6 dB) would
otherwise keep its leaves, which restore them, from every image (demo haze: 16.5 → 18.3 dB). The image goes to
the deepest node kept (BENCHMARKS.md, "sixth session: local calibration" and "seventh session").

The embedding can be fooled where two kinds of image look alike to the extractor: Rain100L photos and bright
clean scenes land in a haze type node and are darkened by 6 to 31 dB. The bank also keeps each sample's dark
channel floor (`dark_floor`): haze adds airlight A(1 - t) to every pixel, so a hazy image has no dark patch, while
most photos keep some (He et al., the dark channel prior). Each node's floor minimum is the `floor_quantile`
quantile of the floors of the bank samples it did not harm; an image whose floor lies below the minimum of a node
on its path stops above that node (BENCHMARKS.md "tenth session"). Low light does the opposite: it dims every
pixel, highlights included, so the bank also keeps each sample's brightness ceiling (`bright_ceiling`, the 95th
percentile of luminance), and a node whose samples were exposed (a rain leaf) does not take an image whose
highlights are dimmer than nearly all of theirs (`ceiling_quantile`; `light_depth`, "eleventh session"). The
converse holds for low light: a node that only ever helped dim images does not take one whose highlights are more
than HELPED_CEILING_FACTOR times (a stop) brighter than those of nearly all the samples it helped. A dark forest
over bright snow (CBSD68 167062) lies deep inside `bench/quality.py`'s low-light types, whose neighbours there
gained +4.8 to +15 dB, and they re-exposed it, 30.35 → 10.75 dB ("sixteenth session").

The bank also speaks for finer experts (`promote`): where the router stops above a node but nearly all of the
neighbours that went through it gained clearly there (at least PROMOTE_GAIN_DB on average over the node kept
before it, at most PROMOTE_HARM_SHARE of them harmed), the image goes down to it, within the clean and light
checks; such evidence also passes the support check, except into a type's own outer shell (model/fallback.py).
The router's level head learns its margin on training data and stays coarse on what it has not seen; the
neighbours' outcome is evidence it lacks (an unseen haze+blur mixture +5.8 dB, a Rain100L photo the haze+rain
type darkened restored by its leaf, BENCHMARKS.md "twelfth session").

The bank is stored beside a bundle in calibration.safetensors (`unirestorer calibrate BUNDLE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

K, HARM_SHARE, MIN_MEMBERS = 30, 1 / 3, 3
FLOOR_QUANTILE = 0.05  # a node's floor minimum leaves out this share of the samples it did not harm
FLOOR_PATCH, FLOOR_PERCENTILE = 7, 0.05  # the dark channel's window (px) and the percentile that is its floor
CEILING_QUANTILE = 0.01  # the same for ceilings; 5 % also kept the darkest heavy low light from low-light leaves
CEILING_PERCENTILE = 0.95  # the luminance percentile that is an image's ceiling
# a node takes no image whose ceiling exceeds this factor times the (1 - ceiling_quantile) quantile of the ceilings of
# the bank samples it helped: only nodes that helped dim images alone (below 0.5) are bounded at all, and a low-light
# leaf keeps LOL photos a little brighter than its darkest samples (LOL 1: 0.29 against 0.19)
HELPED_CEILING_FACTOR = 2.0
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights
HARM_DB = 0.5  # a loss larger than this is harm, as the robustness benchmark counts it
# promotion's bar: replayed on three bundles' records (about 2,000 images), 1 dB and a tenth moved 18 images, all
# for the better; a fifth harmed let a mild photo into a node that darkened it by 26 dB ("twelfth session")
PROMOTE_GAIN_DB, PROMOTE_HARM_SHARE = 1.0, 0.1
PSNR_CAP = 50.0  # dB: identical images score infinity; past 50 dB the difference is invisible (unirestorer/shifts.py)


def dark_floor(x: Tensor) -> Tensor:
    """Images [B,3,H,W] in [0,1] → [B]: the 5th percentile of the 7x7 dark channel (the minimum over colours and
    the window). A percentile, not the minimum, so a few black pixels do not make a hazy image look clear."""
    dark = -F.max_pool2d(-x.detach().float().amin(1, keepdim=True), FLOOR_PATCH, 1, FLOOR_PATCH // 2).flatten(1)
    k = 1 + int(FLOOR_PERCENTILE * (dark.shape[1] - 1))  # kthvalue: torch.quantile refuses inputs over 16M values
    return dark.kthvalue(k, dim=1).values


def bright_ceiling(x: Tensor) -> Tensor:
    """Images [B,3,H,W] in [0,1] → [B]: the 95th percentile of luminance. A percentile, not the maximum, so a
    lamp or a specular point does not make a dark image look exposed."""
    luma = _luminance(x).flatten(1)
    k = 1 + int(CEILING_PERCENTILE * (luma.shape[1] - 1))
    return luma.kthvalue(k, dim=1).values


def mean_luma(x: Tensor) -> Tensor:
    """Images [B,3,H,W] in [0,1] → [B]: mean luminance, the exposure the guard in `UniRestorer.route` keeps."""
    return _luminance(x).mean((1, 2))


def _luminance(x: Tensor) -> Tensor:
    """Images [B,3,H,W] → luminance [B,H,W], fp32."""
    return (x.detach().float() * x.new_tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)).sum(1)


class _Restorer(Protocol):  # what `measure` needs of a UniRestorer (model/unirestorer.py imports this module)
    tree: object

    def embed(self, x: Tensor) -> Tensor: ...

    def level_psnr(self, x: Tensor, gt: Tensor, paths: Tensor) -> Tensor: ...


@dataclass
class Verdict:
    """Per image: the deepest level the bank vouches for (at most the cap `check` was given), and at the node
    of the cap's level how many neighbours went through it, their mean gain over the node kept before it (dB)
    and how many of them it harmed; `refused` is that node where the bank refused it, else -1 (zeros and -1
    at cap 0 and on a one-node tree)."""

    depth: Tensor  # [B]
    refused: Tensor  # [B] node id or -1
    members: Tensor  # [B]
    gain: Tensor  # [B]
    harmed: Tensor  # [B]


class Calibration:
    def __init__(self, embeddings: Tensor, paths: Tensor, psnr: Tensor, leaf_paths: Tensor, k: int = K,
                 harm_share: float = HARM_SHARE, min_members: int = MIN_MEMBERS, shards: Sequence[str] = (),
                 floors: Tensor | None = None, floor_quantile: float = FLOOR_QUANTILE,
                 ceilings: Tensor | None = None, ceiling_quantile: float = CEILING_QUANTILE) -> None:
        n, levels = len(embeddings), leaf_paths.shape[1]
        if embeddings.ndim != 2 or paths.shape != (n, levels) or psnr.shape != (n, levels) or not n:
            raise ValueError(f"calibration: embeddings {tuple(embeddings.shape)}, paths {tuple(paths.shape)} and psnr "
                             f"{tuple(psnr.shape)} must be [N, d], [N, {levels}], [N, {levels}] with N > 0")
        known = (paths[:, None, :] == leaf_paths.to(paths.device)[None]).all(-1).any(1)
        if not bool(known.all()):
            row = int((~known).nonzero()[0])
            raise ValueError(f"calibration: sample {row}'s path {paths[row].tolist()} is not a root-to-leaf path "
                             f"of the tree")
        if not (k >= 1 and 0 <= harm_share <= 1 and min_members >= 1 and 0 <= floor_quantile < 0.5
                and 0 <= ceiling_quantile < 0.5):
            raise ValueError(f"calibration: k {k} must be >= 1, harm_share {harm_share} in [0, 1], min_members "
                             f"{min_members} >= 1, floor_quantile {floor_quantile} and ceiling_quantile "
                             f"{ceiling_quantile} in [0, 0.5)")
        for name, values in (("floors", floors), ("ceilings", ceilings)):
            if values is not None and values.shape != (n,):
                raise ValueError(f"calibration: {name} {tuple(values.shape)} must be [{n}], one per sample")
        self.embeddings, self.paths, self.psnr = embeddings.float(), paths.long(), psnr.float().clamp(max=PSNR_CAP)
        self.k, self.harm_share, self.min_members = int(k), float(harm_share), int(min_members)
        self.shards = list(shards)  # provenance: what the bank was measured on
        self.floors, self.floor_quantile = (None if floors is None else floors.float()), float(floor_quantile)
        self.ceilings, self.ceiling_quantile = (None if ceilings is None else ceilings.float()), float(ceiling_quantile)
        n_nodes = int(leaf_paths.max()) + 1
        self.floor_min = self._bounds(self.floors, self.floor_quantile, n_nodes)  # [n_nodes]; -inf: no evidence
        self.ceiling_min = self._bounds(self.ceilings, self.ceiling_quantile, n_nodes)
        # [n_nodes]; inf: no evidence; above 1, which bounds nothing, for a node that helped bright images
        self.ceiling_max = HELPED_CEILING_FACTOR * self._bounds(self.ceilings, 1 - self.ceiling_quantile, n_nodes,
                                                                helped=True)

    def _bounds(self, values: Tensor | None, quantile: float, n_nodes: int, helped: bool = False) -> Tensor:
        """Per node, the `quantile` quantile of `values` (floors or ceilings) over the bank samples it did not
        harm (at most HARM_DB below its parent), or with `helped` over those it helped (more than HARM_DB above
        it); the root, and nodes with fewer than `min_members` such samples, -inf (inf with `helped`).
        Minima are one-sided: a node that restored hazy images needs a raised floor, one that restored exposed
        images needs bright highlights; one that restored clear or dark images takes hazy or exposed ones too (a
        two-sided floor range cost the demo's low-light crops 0.5 dB)."""
        bounds = torch.full((n_nodes,), torch.inf if helped else -torch.inf)
        if values is None:
            return bounds
        for level in range(1, self.paths.shape[1]):
            step = self.psnr[:, level] - self.psnr[:, level - 1]
            chosen = step > HARM_DB if helped else step >= -HARM_DB
            for node in self.paths[:, level].unique().tolist():
                members = values[chosen & (self.paths[:, level] == node)]
                if len(members) >= self.min_members:
                    bounds[node] = members.quantile(quantile)
        return bounds

    def light_depth(self, floors: Tensor, ceilings: Tensor, paths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image, the deepest level down `paths` [B, n_levels] whose nodes' floor and ceiling minima its dark
        channel floor `floors` [B] and brightness ceiling `ceilings` [B] all reach, and whose ceiling maxima its
        ceiling does not pass (the leaf's level for what the bank does not keep), the first node it does not
        reach (-1 where it reaches all), and whether that node's ceiling, not its floor, refused it."""
        minima = torch.stack([self.floor_min, self.ceiling_min]).to(paths.device)[:, paths]  # [2, B, n_levels]
        inside = torch.stack([floors, ceilings]).to(paths.device)[..., None] >= minima
        inside[1] &= ceilings.to(paths.device)[:, None] <= self.ceiling_max.to(paths.device)[paths]
        inside[..., 0] = True
        depth = inside.long().cumprod(2).sum(2) - 1  # [2, B]: per statistic
        levels = paths.shape[1]
        first = depth.amin(0)
        outside = paths.gather(1, (first + 1).clamp(max=levels - 1)[:, None]).squeeze(1)
        return first, torch.where(first < levels - 1, outside, -1), depth[1] < depth[0]

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def neighbours(self) -> int:
        """How many bank samples vote for an image: k, or the whole bank where it is smaller."""
        return min(self.k, len(self))

    def check(self, embeddings: Tensor, paths: Tensor, cap: Tensor | None = None, min_gain: float = 0.0,
              harm_share: float | None = None, allowed: Tensor | None = None) -> Verdict:
        """The level each image's nearest bank samples vouch for, down its own path `paths` [B, n_levels] to
        level `cap` [B] (the deepest the router and the other checks allow; default: the leaf), at the levels
        `allowed` [B, n_levels] (default: all): a node is kept where their mean gain over the node kept before it
        is at least `min_gain` dB and at most `harm_share` (default: the bank's) of them were harmed."""
        share = self.harm_share if harm_share is None else harm_share
        x = embeddings.detach().float()
        zero = torch.zeros(len(x), dtype=torch.long, device=x.device)
        levels = paths.shape[1]
        cap = torch.full_like(zero, levels - 1) if cap is None else cap.to(x.device).clamp(0, levels - 1)
        members, gain, harmed = zero.clone(), zero.float(), zero.clone()
        kept = zero.clone()
        if levels > 1:
            bank = self.embeddings.to(x.device)
            near = torch.cdist(x, bank).topk(self.neighbours, dim=1, largest=False).indices  # [B, k]
            member = self.paths.to(x.device)[near] == paths[:, None, :]  # [B, k, n_levels]: went through that node
            psnr = self.psnr.to(x.device)[near]  # [B, k, n_levels]
            for level in range(1, levels):
                base = psnr.gather(2, kept[:, None, None].expand(-1, psnr.shape[1], 1)).squeeze(2)
                through = member[..., level]
                count = through.sum(1)
                step = psnr[..., level] - base  # [B, k]: over the node kept so far
                mean_gain = (step * through).sum(1) / count.clamp_min(1)
                lost = ((step < -HARM_DB) & (psnr[..., level] < psnr[..., 0] - HARM_DB) & through).sum(1)
                ok = (count >= self.min_members) & (mean_gain >= min_gain) & (lost <= share * count)
                at_cap = cap == level
                members = torch.where(at_cap, count, members)
                gain = torch.where(at_cap, mean_gain, gain)
                harmed = torch.where(at_cap, lost, harmed)
                if allowed is not None:
                    ok &= allowed[:, level].to(x.device)
                kept = torch.where(ok & (level <= cap), level, kept)
        at = paths.gather(1, cap[:, None]).squeeze(1)
        refused = torch.where(kept < cap, at, -1)
        return Verdict(kept, refused, members, gain, harmed)

    def promote(self, embeddings: Tensor, paths: Tensor, cap: Tensor, allowed: Tensor | None = None) -> Verdict:
        """`check` at promotion's bar: the level the neighbours' clear gains vouch for, down to `cap`."""
        return self.check(embeddings, paths, cap, PROMOTE_GAIN_DB, PROMOTE_HARM_SHARE, allowed)

    # ---- persistence ------------------------------------------------------------------------
    def to_state(self) -> tuple[dict, dict[str, Tensor]]:
        meta = {"samples": len(self), "k": self.k, "harm_share": self.harm_share, "min_members": self.min_members,
                "shards": self.shards}
        tensors = {"embeddings": self.embeddings.contiguous(), "paths": self.paths.contiguous(),
                   "psnr": self.psnr.contiguous()}
        if self.floors is not None:  # banks measured before the floors were kept have neither
            meta["floor_quantile"], tensors["floors"] = self.floor_quantile, self.floors.contiguous()
        if self.ceilings is not None:  # nor those measured before the ceilings
            meta["ceiling_quantile"], tensors["ceilings"] = self.ceiling_quantile, self.ceilings.contiguous()
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, Tensor], leaf_paths: Tensor) -> "Calibration":
        return cls(tensors["embeddings"], tensors["paths"], tensors["psnr"], leaf_paths, meta["k"],
                   meta["harm_share"], meta["min_members"], meta.get("shards", ()), tensors.get("floors"),
                   meta.get("floor_quantile", FLOOR_QUANTILE), tensors.get("ceilings"),
                   meta.get("ceiling_quantile", CEILING_QUANTILE))


@torch.no_grad()
def measure(model: _Restorer, batches: Iterable[dict], samples: int, leaf_paths: Tensor,
            shards: Sequence[str] = (), on_batch: Callable[[int], object] = lambda n: None) -> Calibration:
    """The bank of the first `samples` images of `batches` (dicts with "lq" and "gt" [B,3,H,W]): each image's
    embedding, tree path, every path expert's PSNR, its dark channel floor and its brightness ceiling.
    `on_batch(n)` reports progress."""
    embs, paths, psnr, floors, ceilings, seen = [], [], [], [], [], 0
    for b in batches:
        lq, gt = b["lq"][: samples - seen], b["gt"][: samples - seen]
        e = model.embed(lq)
        p = model.tree.path(e)
        embs.append(e.float().cpu())
        paths.append(p.cpu())
        psnr.append(model.level_psnr(lq, gt, p).float().cpu())
        floors.append(dark_floor(lq).cpu())
        ceilings.append(bright_ceiling(lq).cpu())
        seen += len(lq)
        on_batch(len(lq))
        if seen >= samples:
            break
    if not seen:
        raise ValueError("calibration: the shards gave no samples")
    return Calibration(torch.cat(embs), torch.cat(paths), torch.cat(psnr), leaf_paths, shards=shards,
                       floors=torch.cat(floors), ceilings=torch.cat(ceilings))
