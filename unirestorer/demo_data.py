"""The demo's data: photos split into training, validation and held-out, held-out crops degraded with a
fixed seed, and one shard set per task; `Sizes` holds everything that sets the demo's cost."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

DEMO_TASKS = ("noise", "blur", "rain", "haze", "lowlight")
# trained whatever the tasks: clean photos, so every stage learns that some images need nothing done (the
# extractor a place for them, the root expert and a clean node to leave them alone)
ALWAYS_TRAINED = ("clean",)
SHARED_PHOTOS = Path("..") / "shared" / "data" / "train" / "BSDS_clean"  # beside the repository
# scikit-image's colour photos (no download): the fallback training set, and the held-out photos
FALLBACK_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
HELDOUT_PHOTOS = ("chelsea", "stereo_motorcycle")


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the demo's cost; `FULL` for `unirestorer demo`, `QUICK` for smoke tests."""

    train_photos: int  # at most this many training photos
    val_photos: int  # photos (not trained on) for the validation shards
    test_photos: int  # photos held out for the final table (from a photo folder)
    per_image: int  # stored clean crops per training photo and task
    stored: int  # stored crop size; training streams take random `patch` crops of it
    patch: int  # training crop size (also the extractor's crop)
    eval_crop: int  # held-out crop size
    eval_per_photo: int  # held-out crops per held-out photo
    shard_size: int
    cluster_samples: int  # training samples embedded to build the tree
    micro_batch: dict[str, int]  # per rank, per stage
    steps: dict[str, int]  # max_steps per trained stage
    lr: dict[str, float]  # peak LR per trained stage
    log_every: int


FULL = Sizes(train_photos=300, val_photos=20, test_photos=12, per_image=4, stored=128, patch=64, eval_crop=128,
             eval_per_photo=2,
             shard_size=256, cluster_samples=1500,
             micro_batch={"extractor": 16, "cluster": 32, "experts": 8, "router": 8},
             steps={"extractor": 2000, "experts": 900, "router": 300},
             lr={"extractor": 3e-3, "experts": 2e-3, "router": 2e-3}, log_every=50)  # fmt: skip
QUICK = Sizes(train_photos=5, val_photos=1, test_photos=2, per_image=2, stored=64, patch=64, eval_crop=64,
              eval_per_photo=1,
              shard_size=64, cluster_samples=80,
              micro_batch={"extractor": 4, "cluster": 4, "experts": 4, "router": 4},
              steps={"extractor": 3, "experts": 3, "router": 3},
              lr={"extractor": 3e-3, "experts": 1e-3, "router": 1e-3}, log_every=1)  # fmt: skip


# ---- data ---------------------------------------------------------------------------------------
def save_photos(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Write the bundled photos `names` as PNGs (RGB, uint8) into `folder`."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        path = folder / f"{name}.png"
        Image.fromarray(img[..., :3]).save(path)
        paths.append(path)
    return paths


def demo_photos(source: Path | None, out: Path, sizes: Sizes) -> tuple[Path, Path, list[Path], str]:
    """Training and validation photos copied into out/photos/{train,val}, the held-out photos, and a description.

    From a folder of photos (`--photos`, else ../shared's BSDS500 images), the first `test_photos` are
    held out for the final table, the next `val_photos` make the validation shards and the rest (at most
    `train_photos`) the training shards. Without such a folder: scikit-image's five bundled photos train
    (validation on other crops of them) and its chelsea and stereo_motorcycle are held out.
    """
    from unirestorer.data_shards.writer import list_images

    train, val = out / "photos" / "train", out / "photos" / "val"
    source = source or next((p for p in (Path.cwd() / SHARED_PHOTOS, Path(__file__).resolve().parents[1] / SHARED_PHOTOS)
                             if p.is_dir()), None)  # fmt: skip
    if source is None:
        bundled = save_photos(train, FALLBACK_PHOTOS)
        shutil.copytree(train, val)
        heldout = save_photos(out / "photos" / "heldout", HELDOUT_PHOTOS)
        return train, val, heldout, (f"scikit-image's {len(bundled)} bundled photos (no {SHARED_PHOTOS} beside the "
                                     f"repository: expect weak recognition on new photos); held out: "
                                     f"{', '.join(HELDOUT_PHOTOS)}")
    photos = list_images(source)
    if len(photos) < 3:
        raise ValueError(f"--photos {source}: needs at least 3 images (held-out, validation, training), found "
                         f"{len(photos)}")
    n_test = min(sizes.test_photos, len(photos) // 3)
    n_val = min(sizes.val_photos, len(photos) // 3)
    heldout = photos[:n_test]
    for folder, chosen in ((val, photos[n_test:n_test + n_val]), (train, photos[n_test + n_val:][:sizes.train_photos])):
        folder.mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(chosen):
            shutil.copyfile(photo, folder / f"{i:04d}{photo.suffix.lower()}")
    n_train = len(list(train.iterdir()))
    return train, val, heldout, (f"{source.resolve()}: {n_test} held out, {n_val} for validation, {n_train} for "
                                 f"training")


def save_crops(photos: list[Path], folder: Path, size: int, per_photo: int) -> list[Path]:
    """Non-overlapping `size` crops spread over each photo's grid: the held-out clean images."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for photo in photos:
        img = np.asarray(Image.open(photo).convert("RGB"))
        cells = [(y, x) for y in range(img.shape[0] // size) for x in range(img.shape[1] // size)]
        k = min(per_photo, len(cells))
        for y, x in (cells[int((i + 0.5) * len(cells) / k)] for i in range(k)):  # k distinct, evenly spread
            path = folder / f"{photo.stem}_{y}_{x}.png"
            Image.fromarray(img[y * size : (y + 1) * size, x * size : (x + 1) * size]).save(path)
            paths.append(path)
    return paths


def degrade_heldout(clean: Path, out: Path, tasks: tuple[str, ...], seed: int = 0) -> dict[str, list]:
    """Per task, the clean crops degraded with a fixed seed, saved as 8-bit PNGs in out/TASK/; returns the
    evaluation samples (LQ exactly as saved, with their labels)."""
    import numpy as np

    from unirestorer.data_shards.imageio import encode_png, to_uint8
    from unirestorer.evaluate import load_synthetic

    samples = {}
    for task in tasks:
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        samples[task] = load_synthetic(clean, task, seed, multiple=16)
        for s in samples[task]:
            (folder / f"{s.name}.png").write_bytes(encode_png(s.lq))
            s.lq = to_uint8(s.lq).astype(np.float32) / 255  # what restore reads back from the PNG
    return samples


def shard_workers(photos: Path) -> int:
    """Processes that write a shard set: one per core (at most 8) for a hundred photos or more; fewer are
    written in-process, where starting the processes (~2 s) would cost more than it saves. The shards are
    the same bytes either way (data_shards/writer.py)."""
    from unirestorer.data_shards.imageio import input_files

    return min(os.cpu_count() or 1, 8) if len(input_files(photos)[0]) >= 100 else 1


def write_shards(photos: Path, out: Path, tasks: tuple[str, ...], sizes: Sizes, per_image: int, seed: int
                 ) -> list[str]:  # fmt: skip
    """One shard set per task (so the stages can mix tasks evenly); returns their patterns."""
    from unirestorer.data_shards.writer import write_synthetic

    patterns, workers = [], shard_workers(photos)
    for i, task in enumerate(tasks):  # seed + i: each task's crops come from other places of the photos
        m = write_synthetic(photos, out / task, (task,), per_image=per_image, patch=sizes.stored, seed=seed + i,
                            shard_size=sizes.shard_size, workers=workers, force=True)  # fmt: skip
        n = len(m["shards"])
        patterns.append(shard_pattern(out / task, n))
    return patterns


def shard_pattern(folder: Path, n: int) -> str:
    """The brace pattern of the n shards `shards write` made in folder."""
    return str(folder / (f"shard-{{000000..{n - 1:06d}}}.tar" if n > 1 else "shard-000000.tar"))


