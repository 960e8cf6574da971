"""Standard dataset layouts -> labelled shard sets: pairing, labels, skips and the one summary line.

Every tree is a tiny fake of the real one, with its real naming: odd names, nested sequences,
many-to-one haze, files that do not pair and files that do not decode.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from unirestorer.data_shards import layouts
from unirestorer.data_shards.imageio import decode_png
from unirestorer.data_shards.shards import expand_source

from unirestorer import cli


def img(path: Path, seed: int, size: tuple[int, int] = (24, 32)) -> np.ndarray:
    """A distinct image per seed, saved at `path` (format from the suffix); returns the pixels as decoded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(128, 40, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")


def samples(folder: Path) -> list[dict]:
    """Every sample of every shard in `folder`: json meta plus decoded lq/gt."""
    out = []
    for shard in sorted(folder.glob("shard-*.tar")):
        by_key: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, field = m.name.partition(".")
                by_key.setdefault(key, {})[field] = tar.extractfile(m).read()
        for s in by_key.values():
            out.append({**json.loads(s["json"]), "lq": decode_png(s["lq.png"]), "gt": decode_png(s["gt.png"])})
    return out


@pytest.fixture
def promptir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """PromptIR's data/Train with Denoise/ (odd name, nested, corrupt), Derain/ (an LQ and a GT without
    partner) and Dehaze/ (two hazy images of one clear image, a bad name, a clear image without haze)."""
    root, px = tmp_path / "Train", {}
    px["den_a"] = img(root / "Denoise" / "img 01.png", 1)
    px["den_b"] = img(root / "Denoise" / "WED" / "00042.bmp", 2)
    corrupt(root / "Denoise" / "broken.png")
    px["rain1"], px["norain1"] = img(root / "Derain/rainy/rain-1.png", 3), img(root / "Derain/gt/norain-1.png", 4)
    px["rain12"], px["norain12"] = img(root / "Derain/rainy/rain-12.png", 5), img(root / "Derain/gt/norain-12.png", 6)
    img(root / "Derain/rainy/rain-3 (copy).png", 7)
    img(root / "Derain/gt/norain-99.png", 8)
    px["h1a"] = img(root / "Dehaze/synthetic/part1/0001_0.8_0.2.jpg", 9)
    px["h1b"] = img(root / "Dehaze/synthetic/part2/0001_1_0.04.jpg", 10)
    px["h2"] = img(root / "Dehaze/synthetic/part2/0002_0.85_0.12.jpg", 11)
    img(root / "Dehaze/synthetic/part1/hazy.jpg", 12)
    px["c1"], px["c2"] = img(root / "Dehaze/original/0001.jpg", 13), img(root / "Dehaze/original/0002.png", 14)
    img(root / "Dehaze/original/0003.jpg", 15)
    (root / "readme.txt").write_text("downloaded from ...")
    return root, px


def test_promptir_layout_pairs_labels_and_summary(promptir, tmp_path, capsys):
    root, px = promptir
    out = tmp_path / "shards"
    rc = cli.main(["shards", "write", "--layout", "promptir", "--root", str(root), "--out", str(out), "--workers", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == (
        f"promptir layout in {root}: 7 pairs written (samples: haze 3, noise 2, rain 2); 5 skipped "
        f"(4 unpaired, 1 unreadable or mismatched); 1 files ignored (not part of the layout)")
    for reason in ("rain-3 (copy).png: no ground truth norain-3 (copy).* for it",
                   "norain-99.png: no input image pairs with it", "hazy.jpg: name does not fit the promptir layout",
                   "original/0003.jpg: no input image pairs with it", "broken.png: not a readable image"):
        assert reason in captured.err

    rain = {s["lq_source"]: s for s in samples(out / "rain")}
    assert {k: s["source"] for k, s in rain.items()} == {"Derain/rainy/rain-1.png": "Derain/gt/norain-1.png",
                                                          "Derain/rainy/rain-12.png": "Derain/gt/norain-12.png"}
    assert np.array_equal(rain["Derain/rainy/rain-12.png"]["lq"], px["rain12"])
    assert np.array_equal(rain["Derain/rainy/rain-12.png"]["gt"], px["norain12"])
    assert rain["Derain/rainy/rain-1.png"]["label"] == {
        "task": "rain", "intensity": None,
        "components": [{"family": "rain", "type": "real", "params": {}, "intensity": None}]}

    haze = {s["lq_source"]: s for s in samples(out / "haze")}
    assert {k: (s["source"], s["label"]["components"][0]["params"]) for k, s in haze.items()} == {
        "Dehaze/synthetic/part1/0001_0.8_0.2.jpg": ("Dehaze/original/0001.jpg", {"A": 0.8, "beta": 0.2}),
        "Dehaze/synthetic/part2/0001_1_0.04.jpg": ("Dehaze/original/0001.jpg", {"A": 1.0, "beta": 0.04}),
        "Dehaze/synthetic/part2/0002_0.85_0.12.jpg": ("Dehaze/original/0002.png", {"A": 0.85, "beta": 0.12})}
    for name, lq, gt in (("part1/0001_0.8_0.2.jpg", "h1a", "c1"), ("part2/0001_1_0.04.jpg", "h1b", "c1"),
                         ("part2/0002_0.85_0.12.jpg", "h2", "c2")):
        s = haze[f"Dehaze/synthetic/{name}"]
        assert np.array_equal(s["lq"], px[lq]) and np.array_equal(s["gt"], px[gt]) and s["label"]["intensity"] is None

    noise = {s["source"]: s for s in samples(out / "noise")}
    assert sorted(noise) == ["Denoise/WED/00042.bmp", "Denoise/img 01.png"]
    sigmas = [noise[k]["label"]["components"][0]["params"]["sigma"] for k in sorted(noise)]
    # PromptIR's σ in rotation over the sorted files (broken.png held 25), intensity σ/50 for the extractor
    assert sigmas == [15.0, 50.0]
    assert [noise[k]["label"]["intensity"] for k in sorted(noise)] == [0.3, 1.0]
    for key, sigma in zip(sorted(noise), sigmas):
        s = noise[key]
        assert np.array_equal(s["gt"], px["den_b" if "WED" in key else "den_a"])
        assert np.std(s["lq"].astype(float) - s["gt"]) == pytest.approx(sigma, rel=0.15)

    assert cli.main(["shards", "inspect", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{out}: 3 shard sets, 7 samples: haze 3, noise 2, rain 2"
    assert expand_source(str(out / "haze")) == [str(out / "haze" / "shard-000000.tar")]  # a folder is a shard set


def test_promptir_parts_may_be_missing_but_not_all(promptir, tmp_path, capsys):
    root, _ = promptir
    for part in ("Denoise", "Dehaze"):
        for p in sorted((root / part).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / part).rmdir()
    rc = cli.main(["shards", "write", "--layout", "promptir", "--root", str(root), "--out", str(tmp_path / "o"),
                   "--workers", "1"])  # fmt: skip
    assert rc == 0 and capsys.readouterr().out.strip().endswith("missing: Denoise/, Dehaze/")
    assert (tmp_path / "o" / "rain" / "shard-000000.tar").is_file()  # still OUT/<task>/, as the recipes expect
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["shards", "write", "--layout", "promptir", "--root", str(empty), "--out", str(tmp_path / "p")]) == 2
    assert "none of Denoise/, Derain/, Dehaze/" in capsys.readouterr().err


def test_rain100l_release_layout_side_by_side(tmp_path):
    root = tmp_path / "RainTrainL"
    rain, norain = img(root / "rain-7.png", 1), img(root / "norain-7.png", 2)
    img(root / "rain-8.png", 3)
    scan = layouts.scan_rain100l(root)
    assert [(p.lq.name, p.gt.name) for p in scan.sets["rain"]] == [("rain-7.png", "norain-7.png")]
    assert scan.unpaired == [f"{root / 'rain-8.png'}: no ground truth norain-8.* for it"] and scan.ignored == []
    layouts.write_scan(scan, tmp_path / "out", workers=1)
    [s] = samples(tmp_path / "out")
    assert np.array_equal(s["lq"], rain) and np.array_equal(s["gt"], norain) and s["dataset"] == "rain100l"


def test_gopro_sequences_and_ignored_blur_gamma(tmp_path, capsys):
    root = tmp_path / "GOPRO_Large"
    seq1, seq2 = root / "train" / "GOPR0372_07_00", root / "train" / "GOPR0374_11_01"
    pairs = {("GOPR0372_07_00", "000047"): (img(seq1 / "blur/000047.png", 1), img(seq1 / "sharp/000047.png", 2)),
             ("GOPR0374_11_01", "000001"): (img(seq2 / "blur/000001.png", 3), img(seq2 / "sharp/000001.png", 4))}
    img(seq1 / "blur/000048.png", 5)  # its sharp frame is missing
    img(seq1 / "blur_gamma/000047.png", 6)  # by design not read
    img(root / "train" / "GOPR_broken" / "blur" / "000001.png", 7)  # a sequence without sharp/
    rc = cli.main(["shards", "write", "--layout", "gopro", "--root", str(root), "--out", str(tmp_path / "o"),
                   "--workers", "2"])  # fmt: skip
    assert rc == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == (f"gopro layout in {root}: 2 pairs written (samples: blur 2); 2 skipped "
                                            f"(2 unpaired, 0 unreadable or mismatched); 1 files ignored (not part of "
                                            f"the layout)")  # fmt: skip
    assert "GOPR_broken/blur/000001.png: sequence GOPR_broken lacks blur/ or sharp/" in err
    got = {(s["label"]["components"][0]["params"]["sequence"], Path(s["source"]).stem): s for s in samples(tmp_path / "o")}
    assert set(got) == set(pairs)
    for key, (blur, sharp) in pairs.items():
        assert np.array_equal(got[key]["lq"], blur) and np.array_equal(got[key]["gt"], sharp)
        assert got[key]["task"] == "blur" and got[key]["label"]["intensity"] is None


def test_lol_unreadable_and_mismatched_pairs_are_counted(tmp_path, capsys):
    base = tmp_path / "LOL" / "our485"
    low, high = img(base / "low/2.png", 1), img(base / "high/2.png", 2)
    img(base / "high/7.png", 3)  # no low-light partner
    corrupt(base / "low/9.png")
    img(base / "high/9.png", 4)
    img(base / "low/11.png", 5, size=(24, 32))
    img(base / "high/11.png", 6, size=(32, 24))
    rc = cli.main(["shards", "write", "--layout", "lol", "--root", str(tmp_path / "LOL"), "--out", str(tmp_path / "o"),
                   "--workers", "1"])  # fmt: skip
    assert rc == 0
    out, err = capsys.readouterr()
    assert "1 pairs written (samples: lowlight 1); 3 skipped (1 unpaired, 2 unreadable or mismatched)" in out
    assert "low/11.png: LQ is 32x24 but its GT" in err and "low/9.png: not a readable image" in err
    [s] = samples(tmp_path / "o")
    assert np.array_equal(s["lq"], low) and np.array_equal(s["gt"], high) and s["task"] == "lowlight"


def test_basicsr_template_and_regex(tmp_path):
    lq, gt = tmp_path / "LR_bicubic" / "X4", tmp_path / "HR"
    img(lq / "0001_x4.png", 1), img(gt / "0001.png", 2)
    img(lq / "0002.png", 3)
    scan = layouts.scan_basicsr(lq, gt, "sr", template="{}_x4")
    assert [(p.lq.name, p.gt.name) for p in scan.sets["sr"]] == [("0001_x4.png", "0001.png")]
    assert len(scan.unpaired) == 1 and "0002.png: name does not fit the basicsr layout" in scan.unpaired[0]

    snow_lq, snow_gt = tmp_path / "synthetic", tmp_path / "gt"
    for i, name in enumerate(["beach_s1", "beach_s2", "city_s1"]):
        img(snow_lq / f"{name}.jpg", 10 + i)
    for i, name in enumerate(["beach", "city"]):
        img(snow_gt / f"{name}.jpg", 20 + i)
    scan = layouts.scan_basicsr(snow_lq, snow_gt, "snow", lq_regex=r"(.+)_s\d+", gt_name=r"\1")
    assert [(p.lq.stem, p.gt.stem) for p in scan.sets["snow"]] == [("beach_s1", "beach"), ("beach_s2", "beach"),
                                                                   ("city_s1", "city")]  # fmt: skip
    assert scan.unpaired == []
    with pytest.raises(layouts.writer.ShardWriteError, match="exactly once"):
        layouts.scan_basicsr(lq, gt, "sr", template="x4")
    with pytest.raises(layouts.writer.ShardWriteError, match="needs --gt-name"):
        layouts.scan_basicsr(lq, gt, "sr", lq_regex="(.+)")


def test_layout_command_line_errors(tmp_path, capsys):
    assert cli.main(["shards", "write", "--layout", "gopro", "--out", str(tmp_path / "o")]) == 2
    assert "--layout gopro needs --root DIR" in capsys.readouterr().err
    assert cli.main(["shards", "write", "--layout", "basicsr", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--layout basicsr needs --task NAME" in capsys.readouterr().err
    assert cli.main(["shards", "write", "--layout", "lol", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such directory (LOL: our485/{low,high}/)" in capsys.readouterr().err


def test_duplicate_names_are_skipped_not_guessed(tmp_path):
    lq, gt = tmp_path / "low", tmp_path / "high"
    img(lq / "1.png", 1)
    img(lq / "1.jpg", 2)
    img(gt / "1.png", 3)
    img(lq / "2.png", 4)
    img(gt / "2.png", 5)
    img(gt / "2.bmp", 6)
    scan = layouts.scan_basicsr(lq, gt, "lowlight")
    assert scan.sets["lowlight"] == []
    assert sorted(Path(u.split(":")[0]).name for u in scan.unpaired) == ["1.jpg", "1.png", "2.png"]
    assert "several ground truths named 2" in scan.unpaired[-1]


def test_clean_layout_is_the_synthetic_writer(tmp_path, capsys):
    for i in range(2):
        img(tmp_path / "clean" / f"{i}.png", i)
    rc = cli.main(["shards", "write", "--layout", "clean", "--root", str(tmp_path / "clean"), "--tasks", "jpeg",
                   "--patch", "16", "--per-image", "2", "--out", str(tmp_path / "o"), "--workers", "1"])  # fmt: skip
    assert rc == 0 and "wrote 4 samples in 1 shard" in capsys.readouterr().out
    got = samples(tmp_path / "o")
    assert [s["task"] for s in got] == ["jpeg"] * 4 and all(0 <= s["label"]["intensity"] <= 1 for s in got)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["kind"] == "synthetic"
