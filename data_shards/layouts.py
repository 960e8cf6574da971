"""Standard dataset folder layouts -> (LQ, GT) pairs with labels -> WebDataset shards.

`unirestorer shards write --layout NAME --root DIR --out OUT` reads the training sets as their users
have them on disk (DESIGN §4 names the degradations; the issue names the layouts):

    promptir    data/Train/{Denoise,Derain,Dehaze}: clean images (noise added at σ 15/25/50),
                Derain as `rain100l`, Dehaze as `reside-ots`; one shard set per task in OUT/<task>/
    rain100l    rainy/rain-N.* <-> gt/norain-N.*, or rain-N.* beside norain-N.* in one folder
    reside-ots  synthetic/**/ID_A_BETA.* <-> original/ID.* (many to one; A and β kept in the label)
    gopro       [train/]SEQ/blur/N.* <-> SEQ/sharp/N.* (the sequence kept in the label)
    lol         [our485/]low/N.* <-> high/N.*
    basicsr     LQ and GT folders, names mapped by a template ('{}_x4') or a regex (LQ -> GT)
    clean       a plain folder of clean images, synthetic degradations (what `--clean` does)

Every real pair is labelled with its task, the parameters its layout encodes and `intensity: null`
where none is known (the extractor masks unknown intensities). Files that do not pair are skipped and
counted, files a layout does not use by design (GoPro's blur_gamma/) are counted as ignored, and one
summary line reports it all.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from unirestorer.data_shards import writer
from unirestorer.data_shards.degradations import apply_label
from unirestorer.data_shards.imageio import DEFAULT_MAX_PIXELS, ImageReadError, read_rgb

PROMPTIR_SIGMAS = (15.0, 25.0, 50.0)
_OTS_NAME = re.compile(r"(?P<id>[^_]+)_(?P<A>\d+(?:\.\d+)?)_(?P<beta>\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Pair:
    """One training pair; `lq is None` means the LQ is synthesised from `gt` (noise at `sigmas`)."""

    gt: Path
    lq: Path | None
    task: str
    params: dict = field(default_factory=dict)
    sigmas: tuple[float, ...] = ()


@dataclass
class Scan:
    """What a layout found: pairs per task (one shard set each) and every file that did not pair."""

    dataset: str
    root: Path
    sets: dict[str, list[Pair]] = field(default_factory=dict)
    unpaired: list[str] = field(default_factory=list)  # "path: reason"
    ignored: list[str] = field(default_factory=list)  # files outside the layout, by design
    missing: list[str] = field(default_factory=list)  # optional parts of the layout that are absent
    seen: set[Path] = field(default_factory=set)  # every file a layout looked at
    per_task_folders: bool = False  # a multi-task layout writes OUT/<task>/ even when some parts are missing

    def stems(self, folder: Path) -> dict[str, list[Path]]:
        """Files under `folder` by relative path without extension (and marked as looked at)."""
        out: dict[str, list[Path]] = {}
        for p in writer.list_images(folder):
            self.seen.add(p)
            out.setdefault(p.relative_to(folder).with_suffix("").as_posix(), []).append(p)
        return out

    def finish(self) -> "Scan":
        """Every file under the root that no part of the layout looked at is ignored, and counted."""
        self.ignored = [str(p) for p in writer.list_images(self.root) if p not in self.seen]
        return self

    def add(self, task: str, pairs: list[Pair]) -> None:
        self.sets.setdefault(task, []).extend(pairs)

    def merge(self, other: "Scan") -> None:
        for task, pairs in other.sets.items():
            self.add(task, pairs)
        self.unpaired += other.unpaired
        self.missing += other.missing
        self.seen |= other.seen


def _dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise writer.ShardWriteError(f"{path}: no such directory ({what})")
    return path


def match(lq: dict[str, list[Path]], gt: dict[str, list[Path]], gt_key: dict[str, str | None],
          task: str, scan: Scan, params=lambda key: {}) -> list[Pair]:  # fmt: skip
    """Pair each LQ key with the GT key `gt_key[key]` names (None: its name does not fit the layout).
    Several LQ may share a GT (many to one); GT files no LQ points at are reported as unpaired."""
    pairs, used = [], set()
    for key in sorted(lq):
        target = gt_key.get(key)
        if target in gt:
            used.add(target)  # an ambiguous GT is reported once, with its LQ
        if len(lq[key]) > 1:
            scan.unpaired += [f"{p}: several inputs share the name {key}" for p in lq[key]]
        elif target is None:
            scan.unpaired.append(f"{lq[key][0]}: name does not fit the {scan.dataset} layout")
        elif target not in gt:
            scan.unpaired.append(f"{lq[key][0]}: no ground truth {target}.* for it")
        elif len(gt[target]) > 1:
            scan.unpaired.append(f"{lq[key][0]}: several ground truths named {target}: {[str(p) for p in gt[target]]}")
        else:
            pairs.append(Pair(gt[target][0], lq[key][0], task, params(key)))
    scan.unpaired += [f"{p}: no input image pairs with it" for k in sorted(gt.keys() - used) for p in gt[k]]
    return pairs


# ---- the layouts ------------------------------------------------------------------------------
def scan_rain100l(root: Path, dataset: str = "rain100l") -> Scan:
    scan, root = Scan(dataset, root), _dir(root, "Rain100L: rainy/ + gt/, or rain-N beside norain-N")
    split = (root / "rainy").is_dir() and (root / "gt").is_dir()  # PromptIR's Derain/
    if split:
        inputs, targets = scan.stems(root / "rainy"), scan.stems(root / "gt")
    else:  # the original release: rain-N and norain-N side by side
        inputs = targets = scan.stems(root)
    inputs = {k: v for k, v in inputs.items() if not _is_norain(k)}
    gt = {k: v for k, v in targets.items() if _is_norain(k)}
    if split:
        scan.unpaired += [f"{p}: name is not norain-N" for k, v in targets.items() if not _is_norain(k) for p in v]

    def gt_of(key: str) -> str | None:
        head, slash, name = key.rpartition("/")
        return f"{head}{slash}norain-{name[len('rain-'):]}" if name.startswith("rain-") else None

    scan.add("rain", match(inputs, gt, {k: gt_of(k) for k in inputs}, "rain", scan))
    return scan.finish()


def _is_norain(key: str) -> bool:
    return key.rpartition("/")[2].startswith("norain-")


def scan_reside_ots(root: Path, dataset: str = "reside-ots") -> Scan:
    scan, root = Scan(dataset, root), _dir(root, "RESIDE/OTS: synthetic/ + original/")
    hazy = scan.stems(_dir(root / "synthetic", "hazy images ID_A_BETA.*"))
    clear = scan.stems(_dir(root / "original", "clear images ID.*"))
    names = {k: _OTS_NAME.fullmatch(k.rpartition("/")[2]) for k in hazy}

    def params(key: str) -> dict:
        m = names[key]
        return {"A": float(m["A"]), "beta": float(m["beta"])}

    scan.add("haze", match(hazy, clear, {k: m["id"] if m else None for k, m in names.items()}, "haze", scan, params))
    return scan.finish()


def scan_gopro(root: Path, dataset: str = "gopro") -> Scan:
    scan, root = Scan(dataset, root), _dir(root, "GoPro: train/SEQ/{blur,sharp}/")
    base = root / "train" if (root / "train").is_dir() else root
    for seq in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (seq / "blur").is_dir() or not (seq / "sharp").is_dir():
            files = writer.list_images(seq)
            scan.seen.update(files)
            scan.unpaired += [f"{p}: sequence {seq.name} lacks blur/ or sharp/" for p in files]
            continue
        blur, sharp = scan.stems(seq / "blur"), scan.stems(seq / "sharp")
        scan.add("blur", match(blur, sharp, {k: k for k in blur}, "blur", scan, lambda _, s=seq.name: {"sequence": s}))
    return scan.finish()  # blur_gamma/ (gamma-corrected duplicates of blur/) is counted as ignored


def scan_lol(root: Path, dataset: str = "lol") -> Scan:
    scan, root = Scan(dataset, root), _dir(root, "LOL: our485/{low,high}/")
    base = root / "our485" if (root / "our485").is_dir() else root
    low = scan.stems(_dir(base / "low", "low-light inputs"))
    high = scan.stems(_dir(base / "high", "normal-light targets"))
    scan.add("lowlight", match(low, high, {k: k for k in low}, "lowlight", scan))
    return scan.finish()


def scan_basicsr(lq_dir: Path, gt_dir: Path, task: str, template: str = "{}", lq_regex: str | None = None,
                 gt_name: str | None = None) -> Scan:  # fmt: skip
    """BasicSR's paired folders: LQ name = template.format(GT name) (its `filename_tmpl`), or, with a
    regex, GT name = re.fullmatch(lq_regex, LQ name).expand(gt_name) (several LQ may map to one GT)."""
    scan = Scan("basicsr", lq_dir)
    lq, gt = scan.stems(_dir(lq_dir, "LQ folder")), scan.stems(_dir(gt_dir, "GT folder"))
    if lq_regex is not None:
        if gt_name is None:
            raise writer.ShardWriteError("--lq-regex needs --gt-name (e.g. --lq-regex '(.+)_x4' --gt-name '\\1')")
        try:
            rx = re.compile(lq_regex)
            keys = {k: (m.expand(gt_name) if (m := rx.fullmatch(k)) else None) for k in lq}
        except (re.error, IndexError) as e:
            raise writer.ShardWriteError(f"--lq-regex {lq_regex!r} / --gt-name {gt_name!r}: {e}") from None
    else:
        if template.count("{}") != 1:
            raise writer.ShardWriteError(f"--filename-tmpl {template!r} must contain '{{}}' exactly once")
        by_lq = {template.format(k): k for k in gt}
        keys = {k: by_lq.get(k) for k in lq}
    scan.add(task, match(lq, gt, keys, task, scan))
    return scan


def scan_promptir(root: Path, sigmas: tuple[float, ...] = PROMPTIR_SIGMAS) -> Scan:
    """PromptIR's data/Train: Denoise/ (clean), Derain/ (Rain100L), Dehaze/ (RESIDE OTS); absent parts
    are reported as missing, not an error, unless all three are."""
    scan, root = Scan("promptir", root), _dir(root, "PromptIR's data/Train with Denoise/, Derain/, Dehaze/")
    scan.per_task_folders = True
    if (root / "Denoise").is_dir():
        clean = [p for paths in scan.stems(root / "Denoise").values() for p in paths]
        scan.add("noise", [Pair(p, None, "noise", sigmas=sigmas) for p in sorted(clean)])
    else:
        scan.missing.append("Denoise/")
    for part, fn in (("Derain", scan_rain100l), ("Dehaze", scan_reside_ots)):
        if (root / part).is_dir():
            scan.merge(fn(root / part, "promptir"))
        else:
            scan.missing.append(f"{part}/")
    if len(scan.missing) == 3:
        raise writer.ShardWriteError(f"{root}: none of Denoise/, Derain/, Dehaze/ (PromptIR's data/Train layout)")
    return scan.finish()


# ---- writing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LayoutItem:
    """A pair as the writer's workers see it (picklable)."""

    index: int
    source: str  # GT path relative to the layout root, recorded in the samples
    path: Path  # GT
    lq_path: Path | None
    lq_source: str
    label: dict | None  # None: synthesised noise, one sigma per copy
    sigmas: tuple[float, ...]
    dataset: str


def real_label(task: str, params: dict) -> dict:
    """Label of a real pair: its task and the layout's parameters; no intensity is known."""
    return {"task": task, "intensity": None,
            "components": [{"family": task, "type": "real", "params": params, "intensity": None}]}  # fmt: skip


def _noise_label(sigma: float) -> dict:
    from unirestorer.data_shards.loader import noise_label  # the label online re-degradation also gives

    return noise_label(sigma)


def _layout_sample(job: writer._Job, item: _LayoutItem) -> writer._Result:
    notes: list[str] = []
    try:
        gt = read_rgb(item.path, job.max_pixels, notes)
        lq = None if item.lq_path is None else read_rgb(item.lq_path, job.max_pixels, notes)
    except ImageReadError as e:
        return writer._Result([], str(e), notes)
    if lq is not None and lq.shape != gt.shape:
        (lh, lw), (gh, gw) = lq.shape[:2], gt.shape[:2]
        return writer._Result([], f"{item.lq_path}: LQ is {lw}x{lh} but its GT {item.path} is {gw}x{gh}", notes)
    if err := writer._too_small(item, gt, job.patch):
        return writer._Result([], err, notes)
    samples = []
    for k in range(job.per_image if (job.patch or lq is None) else 1):  # whole real pairs: one copy is enough
        seed = [job.seed, item.index, k]
        rng = np.random.default_rng(np.random.SeedSequence(seed))
        y, x, h, w = writer._crop_box(*gt.shape[:2], job.patch, rng)
        g = gt[y : y + h, x : x + w]
        if lq is None:
            label = _noise_label(item.sigmas[(item.index * job.per_image + k) % len(item.sigmas)])
            g = np.round(g * 255) / np.float32(255)  # degrade the 8-bit gt that is stored
            degraded = apply_label(g, label, rng)
        else:
            label, degraded = item.label, lq[y : y + h, x : x + w]
        meta = {"task": label["task"], "label": label, "seed": seed, "crop": [y, x, h, w], "dataset": item.dataset,
                "lq_source": item.lq_source or "synthesised from gt"}  # fmt: skip
        samples.append(writer._sample(item, k, degraded, g, meta))
    return writer._Result(samples, None, notes)


def _items(pairs: list[Pair], root: Path, dataset: str) -> list[_LayoutItem]:
    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    ordered = sorted(pairs, key=lambda p: (rel(p.lq), rel(p.gt)))
    return [_LayoutItem(i, rel(p.gt), p.gt, p.lq, rel(p.lq), None if p.lq is None else real_label(p.task, p.params),
                        p.sigmas, dataset) for i, p in enumerate(ordered)]  # fmt: skip


def write_scan(scan: Scan, out: str | os.PathLike, per_image: int = 1, patch: int = 0, seed: int = 0,
               shard_size: int = 256, workers: int | None = None, force: bool = False,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[dict[str, dict], str]:  # fmt: skip
    """Write one shard set per task (OUT/<task>/ for a multi-task layout, else OUT itself); returns the
    manifests by task and the summary line. Raises ShardWriteError when no pair at all was usable."""
    workers = writer._check_common(per_image, patch, workers)
    out = Path(out)
    for line in scan.unpaired:
        print(f"skipped: {line}", file=sys.stderr)
    job = writer._Job(per_image=per_image, patch=patch, seed=seed, max_pixels=max_pixels)
    manifests, unusable, failed = {}, 0, []
    for task in sorted(scan.sets):
        items = _items(scan.sets[task], scan.root, scan.dataset)
        target = out / task if scan.per_task_folders else out
        args = {"layout": scan.dataset, "root": str(scan.root), "task": task, "per_image": per_image, "patch": patch,
                "seed": seed, "shard_size": shard_size, "workers": workers, "max_pixels": max_pixels}  # fmt: skip
        if not items:
            failed.append(task)
            continue
        try:
            m = writer._run(f"layout:{scan.dataset}", target, items, partial(_layout_sample, job), args, shard_size,
                            workers, force, f"{scan.root} ({task})", [])  # fmt: skip
        except writer.ShardWriteError as e:
            if "nothing usable" not in str(e):
                raise
            failed.append(task)
            unusable += len(items)
            continue
        manifests[task] = m
        unusable += len(m["inputs"]["skipped"])
    line = summary_line(scan, manifests, unusable, failed)
    if not manifests:
        raise writer.ShardWriteError(f"nothing usable in {scan.root}: {line}")
    return manifests, line


def summary_line(scan: Scan, manifests: dict[str, dict], unusable: int, failed: list[str]) -> str:
    """The one line that accounts for every file the layout looked at."""
    written = sum(m["inputs"]["used"] for m in manifests.values())
    samples = ", ".join(f"{t} {m['num_samples']}" for t, m in sorted(manifests.items())) or "none"
    skipped = len(scan.unpaired) + unusable
    line = (f"{scan.dataset} layout in {scan.root}: {written} pairs written (samples: {samples}); {skipped} skipped "
            f"({len(scan.unpaired)} unpaired, {unusable} unreadable or mismatched); {len(scan.ignored)} files ignored "
            f"(not part of the layout)")  # fmt: skip
    if scan.missing:
        line += f"; missing: {', '.join(scan.missing)}"
    if failed:
        line += f"; no usable pair for: {', '.join(failed)}"
    return line
