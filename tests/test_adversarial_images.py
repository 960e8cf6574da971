"""Issue 20 through the real `unirestorer` CLI: no silently wrong image (orientation, NaN, ICC, bit depth,
alpha, animation, hidden files, misaligned or ambiguous eval pairs), ranges refused up front with one line,
outputs that cannot be written refused before the model runs, export's errors and folder rules."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from unirestorer.cli import main
from unirestorer.image_io import load_picture, save_picture
from unirestorer.model.router import select

from test_adversarial_outputs import copy_bundle, edit_tensors, one_line, restore, snapshot

RNG = np.random.default_rng(0)


def photo(h: int = 40, w: int = 56) -> np.ndarray:
    """Smooth content with a bright corner: any rotation or mirroring of it is visible."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.dstack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)]).astype(np.uint8)
    img[: h // 4, : w // 4] = 255
    return img


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "tif", "tif-deflate", "tif-jpeg", "avif"])
def test_every_format_is_read_the_way_a_viewer_shows_it(fmt, tmp_path):
    ext, _, compression = fmt.partition("-")
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.{ext}"
        im = Image.fromarray(photo())
        if ext == "tif":  # TIFF carries the tag in its own header, and Pillow's and OpenCV's decoders apply it
            im.save(path, tiffinfo={274: orientation}, compression=compression or "raw")
        else:
            exif = Image.Exif()
            exif[0x0112] = orientation
            im.save(path, exif=exif, **({"quality": 100} if ext in ("jpg", "avif") else {"lossless": True}
                                        if ext == "webp" else {}))  # fmt: skip
        with Image.open(path) as shown:
            viewer = np.asarray(ImageOps.exif_transpose(shown).convert("RGB")).astype(int)
        got = (load_picture(path).rgb * 255 + 0.5).astype(int)
        assert got.shape == viewer.shape and np.abs(got - viewer).mean() < 3, (fmt, orientation)


def test_restore_keeps_a_rotated_tiff_upright_and_16_bit(tiny_bundle, tmp_path, one_thread):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo()).save(src / "a.tif", tiffinfo={274: 6})  # shown 40 wide, 56 high
    assert cv2.imwrite(str(src / "b.tif"), photo()[..., ::-1].astype(np.uint16) * 257)
    assert restore(tiny_bundle, src, tmp_path / "out") == 0
    assert Image.open(tmp_path / "out" / "a.tif").size == (40, 56)
    assert cv2.imread(str(tmp_path / "out" / "b.tif"), cv2.IMREAD_UNCHANGED).dtype == np.uint16


# ---------------------------------------------------------------- non-finite values, masks


def test_tile_batch_below_one_is_refused_before_anything_runs(photos, tmp_path, capsys):
    rc = None
    with pytest.raises(SystemExit) as stop:
        rc = restore(str(tmp_path / "no-bundle"), photos, tmp_path / "out", "--tile", "16", "--tile-batch", "-1")
    assert stop.value.code == 2 and rc is None
    assert one_line(capsys.readouterr().err) == ("unirestorer restore: error: argument --tile-batch: must be at least 1, "
                                                 "got -1 (see unirestorer restore --help)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, arg, value", [
    ("restore", "--overlap", "-8"), ("restore", "--tile", "-16"), ("restore", "--max-pixels", "0"),
    ("eval", "--multiple", "0"), ("eval", "--border", "-2"), ("eval", "--limit", "0"), ("eval", "--grid", "-1"),
    ("eval", "--tile", "x"), ("serve", "--tile", "-16"), ("serve", "--overlap", "-1"),
    ("serve", "--max-pixels", "0")])  # fmt: skip
def test_out_of_range_arguments_are_one_line(command, arg, value, photos, tmp_path, capsys):
    io = {"restore": ["--input", str(photos), "--output", str(tmp_path / "o")],
          "eval": ["--clean", str(photos), "--synth", "noise:25", "--out", str(tmp_path / "o")], "serve": []}[command]
    with pytest.raises(SystemExit) as stop:
        main([command, "--weights", str(tmp_path / "no-bundle"), *io, arg, value])
    assert stop.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"unirestorer {command}: error: argument {arg}: ") and value in line
    assert not (tmp_path / "o").exists()


def test_non_finite_output_is_never_written(tmp_path):
    from unirestorer.image_io import ImageWriteError

    pic = load_picture(_png(tmp_path / "a.png", photo()))
    with pytest.raises(ImageWriteError, match="holds NaN/Inf values; not written"):
        save_picture(tmp_path / "out.png", np.full_like(pic.rgb, np.nan), pic)
    assert not (tmp_path / "out.png").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overflowing_experts_are_never_saved_or_scored(tiny_bundle, photos, tmp_path, capsys, one_thread):
    bundle = copy_bundle(tiny_bundle, tmp_path)  # finite weights, so the schema accepts them; outputs overflow
    edit_tensors(bundle, lambda t: [v.fill_(1e30) for k, v in t.items() if k.startswith("experts.") and v.ndim == 4])
    assert restore(str(bundle), photos, tmp_path / "out") == 1
    assert "a.png: the restored image holds NaN/Inf values; not written" in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir())
    rc = main(["eval", "--weights", str(bundle), "--clean", str(photos), "--synth", "noise:25", "--device", "cpu",
               "--out", str(tmp_path / "ev")])
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert rc == 2 and last == "error: a: the output of expert 0 holds NaN/Inf values; refusing to score it"
    assert not (tmp_path / "ev").exists() or not list((tmp_path / "ev").iterdir())


def test_all_false_masks_are_refused_not_turned_into_nan():
    leaf_paths = torch.tensor([[0, 1, 3], [0, 1, 4]])
    with pytest.raises(ValueError, match=r"leaf_mask allows no leaf for image\(s\) \[1\]"):
        select(torch.zeros(2, 2), torch.zeros(2, 3), leaf_paths, torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="node_mask allows no node on the chosen leaf's path"):
        select(torch.zeros(1, 2), torch.zeros(1, 3), leaf_paths, None, torch.zeros(1, 5, dtype=torch.bool))


# ---------------------------------------------------------------- what a format cannot hold


def _png(path: Path, pixels: np.ndarray) -> Path:
    """PNG bytes (8/16-bit, RGB(A)) at `path`, whatever its suffix says."""
    ok, data = cv2.imencode(".png", pixels if pixels.ndim == 2 else pixels[..., [2, 1, 0, *range(3, pixels.shape[2])]])
    assert ok
    path.write_bytes(data.tobytes())
    return path


def test_icc_profile_is_written_back(tiny_bundle, tmp_path, one_thread):
    from unirestorer.image_io import _iccp_chunk  # test data: a 16-bit PNG with a profile

    src, profile = tmp_path / "in", ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src.mkdir()
    Image.fromarray(photo()).save(src / "p.jpg", icc_profile=profile, quality=95)
    Image.fromarray(photo()).save(src / "q.png", icc_profile=profile)
    _png(src / "r.png", photo().astype(np.uint16) * 257)  # 16-bit colour: OpenCV's pixels, the profile added
    data = (src / "r.png").read_bytes()
    (src / "r.png").write_bytes(data[:33] + _iccp_chunk(profile) + data[33:])
    assert restore(tiny_bundle, src, tmp_path / "out") == 0
    for name in ("p.jpg", "q.png", "r.png"):
        assert Image.open(tmp_path / "out" / name).info.get("icc_profile") == profile, name
    assert cv2.imread(str(tmp_path / "out" / "r.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16


def test_content_a_format_cannot_hold_needs_force(tiny_bundle, tmp_path, capsys, one_thread):
    src = tmp_path / "in"
    src.mkdir()
    _png(src / "alpha.jpg", np.dstack([photo(), np.full((40, 56), 128, np.uint8)]))  # a PNG named .jpg
    _png(src / "deep.jpg", photo().astype(np.uint16) * 257)
    frames = [Image.fromarray(np.roll(photo(), 8 * i, axis=1)) for i in range(3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    assert restore(tiny_bundle, src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "alpha.jpg would lose the alpha channel (JPEG has none); pass --force" in err
    assert "deep.jpg would lose 16-bit samples (JPEG holds 8); pass --force" in err
    assert "anim.gif.png would lose 2 frame(s) after the first (only the first is restored)" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert restore(tiny_bundle, src, tmp_path / "out", "--force") == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 3 and "warning: anim.gif.png: lost 2 frame(s)" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha.jpg", "anim.gif.png", "deep.jpg"]


def test_entries_not_read_are_counted(tiny_bundle, photos, tmp_path, capsys, one_thread):
    _png(photos / ".hidden.png", photo())
    os.mkfifo(photos / "pipe.png")
    assert restore(tiny_bundle, photos, tmp_path / "out") == 0
    assert ("2 entries of " + str(photos) + " not read (hidden names or not regular files): .hidden.png, pipe.png"
            in capsys.readouterr().err)


# ---------------------------------------------------------------- outputs checked first


def test_unwritable_outputs_are_refused_before_the_model_loads(photos, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    before = snapshot(tmp_path)
    assert restore(str(tmp_path / "no-bundle"), photos, blocker / "out") == 2
    assert one_line(capsys.readouterr().err) == f"error: --output {blocker / 'out'}: {blocker} is not a folder"
    rc = main(["eval", "--weights", str(tmp_path / "no-bundle"), "--clean", str(photos), "--synth", "noise:25",
               "--summary", str(blocker / "summary.md"), "--out", str(tmp_path / "ev")])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == f"error: --summary {blocker / 'summary.md'}: {blocker} is not a folder"
    assert snapshot(tmp_path) == before


def test_a_link_in_a_parent_of_the_output_is_resolved_once(tiny_bundle, photos, tmp_path, one_thread):
    (tmp_path / "disk").mkdir()
    (tmp_path / "home").symlink_to(tmp_path / "disk")
    assert restore(tiny_bundle, photos, tmp_path / "home" / "out") == 0
    assert sorted(p.name for p in (tmp_path / "disk" / "out").iterdir()) == ["a.png", "b.png"]


def test_weights_follow_the_umask_like_every_other_output(tiny_bundle):
    modes = {f.name: f.stat().st_mode & 0o777 for f in Path(tiny_bundle).iterdir()}
    assert modes["weights.safetensors"] == modes["bundle.json"] == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# ---------------------------------------------------------------- eval pairs


def _pairs(tmp_path: Path, lq: dict[str, np.ndarray], gt: dict[str, np.ndarray]) -> tuple[Path, Path]:
    for side, files in (("lq", lq), ("gt", gt)):
        (tmp_path / side).mkdir()
        for name, pixels in files.items():
            _png(tmp_path / side / name, pixels) if name.endswith(".png") else Image.fromarray(pixels).save(
                tmp_path / side / name)
    return tmp_path / "lq", tmp_path / "gt"


def test_eval_refuses_pairs_of_different_sizes(tmp_path, capsys):
    lq, gt = _pairs(tmp_path, {"a.png": photo(50, 50)}, {"a.png": photo(48, 50)})  # both crop to 48x48
    rc = main(["eval", "--weights", str(tmp_path / "no-bundle"), "--pairs", str(lq), str(gt), "--task", "noise"])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == (f"error: {lq / 'a.png'}: 50x50 but its ground truth {gt / 'a.png'} "
                                                 f"is 50x48; refusing to score a misaligned pair")


def test_eval_refuses_two_ground_truths_of_one_name(tmp_path, capsys):
    lq, gt = _pairs(tmp_path, {"a.png": photo()}, {"a.jpg": photo(), "a.png": photo()})
    rc = main(["eval", "--weights", str(tmp_path / "no-bundle"), "--pairs", str(lq), str(gt), "--task", "noise"])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == (f"error: {gt / 'a.jpg'} and {gt / 'a.png'} have the same name 'a'; "
                                                 f"keep one of them")


def test_eval_refuses_a_task_the_model_does_not_know(tiny_bundle, photos, tmp_path, capsys, one_thread):
    rc = main(["eval", "--weights", tiny_bundle, "--clean", str(photos), "--synth", "noise:25", "--task", "rian",
               "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == "error: --task 'rian' unknown; this model knows ['dark', 'noise']"
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------- export


def test_export_errors_go_to_stderr_and_a_corrupt_marker_is_refused(tmp_path, capsys):
    step = tmp_path / "ck" / "step_00000001"
    step.mkdir(parents=True)
    torch.save({"module": {}}, step / "mp_rank_00_model_states.pt")
    (step / "COMPLETE.json").write_text('{"step": 1, "world_')
    assert main(["export", str(step), "--out", str(tmp_path / "bundle")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and one_line(err).startswith(f"error: export failed: checkpoint {step}: "
                                                  f"{step / 'COMPLETE.json'} is corrupt (not valid JSON")
    assert not (tmp_path / "bundle").exists()


def test_export_does_not_write_into_an_unrelated_folder(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    assert main(["export", str(tmp_path / "ck"), "--out", str(tmp_path / "docs")]) == 2
    assert one_line(capsys.readouterr().err) == (f"error: export failed: --out {tmp_path / 'docs'} exists and is not "
                                                 f"empty; pass --overwrite to write the bundle into it")
    assert snapshot(tmp_path) == before


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        _png(folder / name, RNG.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    return folder

