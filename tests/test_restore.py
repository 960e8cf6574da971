"""`unirestorer restore`: tiling without seams, file formats kept, bad files, never overwriting inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from conftest import TINY_EXPERT, free_port
from unirestorer.cli import main
from unirestorer.image_io import load_picture
from unirestorer.model.experts import create_expert
from unirestorer.model.local_stats import local_mean
from unirestorer.model.unirestorer import UniRestorer
from unirestorer.restore import run_expert, tiled


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs on 2 shared cores (tests/conftest.py)


def rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_tiling_covers_and_normalises_exactly():
    x = torch.rand(2, 3, 70, 90)
    f = lambda t: t * 2 + 1  # pointwise: any seam or weight error would show
    for tile, overlap, align in ((32, 8, 1), (32, 12, 16), (64, 0, 16)):
        assert torch.allclose(tiled(f, x, tile, overlap, align=align), f(x), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        tiled(f, x, 30, 8, align=16)


def test_tiled_equals_whole_image_for_every_node(tiny_bundle):
    """TLSC (the fixture's experts have stat_window 32): tiled vs whole >= 45 dB on every node, tiles of 64 and
    128, on a texture under a brightness ramp and its dark version; up to the window the output is the
    global-pooling one, bit for bit."""
    model = UniRestorer.load_bundle(tiny_bundle)
    g = torch.Generator().manual_seed(1)
    tex = F.interpolate(torch.rand(1, 3, 24, 30, generator=g), size=(200, 250), mode="bicubic").clamp(0, 1)
    x = tex * torch.linspace(0.05, 1, 250)
    for node in range(model.tree.n_nodes):
        for img in (x, x * 0.15):
            whole = run_expert(model, node, img, 0, 0)
            for tile, overlap in ((64, 16), (128, 32)):
                assert psnr(run_expert(model, node, img, tile, overlap), whole) >= 45, (node, tile)
        glob = create_expert(**{**TINY_EXPERT, "stat_window": 0}).eval()
        glob.load_state_dict(model.expert(node).state_dict())
        with torch.inference_mode():
            assert torch.equal(model.expert(node)(x[..., :32, :32]), glob(x[..., :32, :32]))


def test_local_statistics_of_a_tile_are_the_whole_images():
    """Away from a tile's border (half a window), its local means are the whole image's; global means are not."""
    x = torch.rand(2, 5, 150, 170, generator=torch.Generator().manual_seed(2)) * torch.linspace(0, 1, 170)
    whole = local_mean(x, 32)
    tile = local_mean(x[..., 40:120, 30:130], 32)
    assert torch.allclose(tile[..., 16:-16, 16:-16], whole[..., 56:104, 46:114], atol=1e-6)
    assert not torch.allclose(x[..., 40:120, 30:130].mean((-2, -1)), x.mean((-2, -1)), atol=1e-2)
    assert torch.allclose(local_mean(x[..., :32, :30], 32), x[..., :32, :30].mean((-2, -1), keepdim=True))
    box = F.avg_pool2d(x, 32, stride=1)  # interior pixels: the plain 32 x 32 box mean around them
    assert torch.allclose(whole[..., 15:15 + box.shape[-2], 15:15 + box.shape[-1]], box, atol=1e-6)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean().clamp_min(1e-20)))


def test_exif_orientation_matches_pillow(tmp_path):
    base = Image.fromarray(rand_u8((5, 7, 3)))
    for orientation in range(1, 9):
        exif = base.getexif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        base.save(path, exif=exif)
        with Image.open(path) as im:
            ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert np.array_equal((load_picture(path).rgb * 255 + 0.5).astype(np.uint8), ref), orientation


@pytest.fixture
def folder(tmp_path) -> Path:
    """One file per format the CLI must keep, plus a broken file."""
    src = tmp_path / "in"
    src.mkdir()
    rgb = rand_u8((40, 56, 3), 1)
    Image.fromarray(rgb).save(src / "a_rgb8.png")
    Image.fromarray(rgb).save(src / "b_photo.jpg", quality=95)
    rgb16 = np.random.default_rng(2).integers(0, 65536, (40, 56, 3), dtype=np.uint16)
    cv2.imwrite(str(src / "c_rgb16.png"), rgb16)
    cv2.imwrite(str(src / "c_rgb16.tif"), rgb16)
    Image.fromarray(np.dstack([rgb, rand_u8((40, 56), 3)]), "RGBA").save(src / "d_rgba.png")
    Image.fromarray(rgb[..., 0]).save(src / "e_gray.png")
    upright_img = Image.fromarray(rgb)  # f_up.png is what f_rot.png shows once rotated upright
    upright_img.save(src / "f_up.png")
    exif = upright_img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": store the pixels rotated the other way
    upright_img.transpose(Image.Transpose.ROTATE_90).save(src / "f_rot.png", exif=exif)
    (src / "g_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return src


def test_restore_folder_keeps_formats_and_skips_bad_files(tiny_bundle, folder, tmp_path, capsys):
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rc = main(["restore", "--weights", tiny_bundle, "--input", str(folder), "--output", str(out),
               "--tile", "32", "--overlap", "8", "--device", "cpu", "--explain", "--allow-skipped"])
    cap = capsys.readouterr()
    assert rc == 0  # --allow-skipped: the one unreadable file does not fail the run
    assert "skipped: " in cap.err and "g_broken.png" in cap.err and "1 of 9 images were skipped" in cap.err
    assert "restored 8 of 9 images" in cap.out
    for name in ("a_rgb8.png", "f_rot.png"):
        assert any(line.startswith(f"{name}: level ") and " node " in line and "p(level)" in line
                   for line in cap.out.splitlines())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # inputs untouched

    def read(name):
        return cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)

    assert read("a_rgb8.png").shape == (40, 56, 3) and read("a_rgb8.png").dtype == np.uint8
    assert read("b_photo.jpg").shape == (40, 56, 3)
    for name in ("c_rgb16.png", "c_rgb16.tif"):  # 16 bits kept, not 8 bits scaled up
        y16 = read(name)
        assert y16.dtype == np.uint16 and y16.shape == (40, 56, 3) and (y16 % 257 != 0).mean() > 0.5
    rgba_in, rgba_out = np.asarray(Image.open(folder / "d_rgba.png")), np.asarray(Image.open(out / "d_rgba.png"))
    assert rgba_out.shape == (40, 56, 4) and np.array_equal(rgba_out[..., 3], rgba_in[..., 3])
    assert not np.array_equal(rgba_out[..., :3], rgba_in[..., :3])  # the colour was restored
    with Image.open(out / "e_gray.png") as im:
        assert im.mode == "L" and im.size == (56, 40)
    assert np.array_equal(read("f_rot.png"), read("f_up.png"))  # EXIF rotation applied before restoring


def test_restore_single_file_with_task_and_failures(tiny_bundle, folder, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["restore", "--weights", tiny_bundle, "--input", str(folder / "a_rgb8.png"), "--output",
                 str(out), "--task", "noise", "--tile", "0", "--device", "cpu"]) == 0
    assert [p.name for p in out.iterdir()] == ["a_rgb8.png"]
    x = torch.from_numpy(load_picture(folder / "a_rgb8.png").rgb).permute(2, 0, 1)
    ref, _ = UniRestorer.load_bundle(tiny_bundle).restore(x, task="noise")  # the model's own untiled path
    ref = (ref.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.int16)
    assert np.abs(np.asarray(Image.open(out / "a_rgb8.png"), dtype=np.int16) - ref).max() <= 1
    assert main(["restore", "--weights", tiny_bundle, "--input", str(folder / "a_rgb8.png"), "--output",
                 str(out), "--task", "snow", "--device", "cpu", "--overwrite"]) == 2
    assert "--task 'snow' unknown" in capsys.readouterr().err
    assert main(["restore", "--weights", tiny_bundle, "--input", str(folder / "a_rgb8.png"), "--output",
                 str(out), "--tile", "40", "--device", "cpu", "--overwrite"]) == 2
    assert "--tile 40 must be a multiple of 16" in capsys.readouterr().err
    # nothing restorable: exit 1
    assert main(["restore", "--weights", tiny_bundle, "--input", str(folder / "g_broken.png"), "--output",
                 str(out), "--device", "cpu"]) == 1
    assert "g_broken.png: not a" in capsys.readouterr().err


def test_restore_refuses_to_overwrite_inputs(tiny_bundle, folder, capsys):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["restore", "--weights", tiny_bundle, "--input", str(folder), "--output",
                 str(folder / ".." / folder.name), "--device", "cpu"]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert main(["restore", "--weights", tiny_bundle, "--input", str(folder / "a_rgb8.png"), "--output",
                 str(folder), "--device", "cpu"]) == 2
    assert "refusing to overwrite input file" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.slow
def test_two_process_restore_does_each_image_once(tiny_bundle, folder, tmp_path):
    """Real `accelerate launch`, 2 CPU processes (gloo): the sorted list is split, nothing is done twice."""
    port, out = free_port(), tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "unirestorer.cli", "restore", "--weights", tiny_bundle, "--input", str(folder), "--output", str(out),
           "--device", "cpu", "--explain", "--tile", "0", "--allow-skipped"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    explained = sorted(line.split(":")[0] for line in done.stdout.splitlines() if ": level " in line)
    good = sorted(p.name for p in folder.iterdir() if p.name != "g_broken.png")
    assert explained == good  # every good image exactly once, over both processes
    assert "restored 8 of 9 images" in done.stdout and sorted(p.name for p in out.iterdir()) == good
