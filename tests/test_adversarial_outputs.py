"""Bad inputs through the real `unirestorer` CLI (restore, eval) and the writers it uses: symlinked,
existing, escaping, huge, truncated outputs and inputs, malicious or damaged bundles. Each case checks the
exit code, the one-line message, and that nothing that existed before was changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

from unirestorer.cli import main
from unirestorer.model.tree import DegradationTree
from unirestorer.safe_files import UnsafePathError, atomic_path, atomic_write


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: file bytes, or the link target for symlinks."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = f"-> {p.readlink()}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    return folder


def restore(bundle: str, src: Path, out: Path, *extra: str) -> int:
    return main(["restore", "--weights", bundle, "--input", str(src), "--output", str(out), "--device", "cpu",
                 "--tile", "0", *extra])


def copy_bundle(tiny_bundle: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


# ---------------------------------------------------------------- outputs


def test_restore_refuses_a_symlink_in_the_output_folder(tiny_bundle, photos, tmp_path, capsys, one_thread):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    (out / "a.png").symlink_to(victim)
    before = snapshot(tmp_path)
    assert restore(tiny_bundle, photos, out) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and f"{out / 'a.png'} is a symbolic link; refusing to write through it" in line
    assert snapshot(tmp_path) == before and victim.read_text() == "precious"


def test_restore_refuses_existing_outputs_unless_overwrite(tiny_bundle, photos, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"an earlier result")
    before = snapshot(tmp_path)
    assert restore(tiny_bundle, photos, out) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{out / 'b.png'} already exists (1 of the outputs do); pass --overwrite" in line
    assert snapshot(tmp_path) == before
    assert restore(tiny_bundle, photos, out, "--overwrite") == 0
    assert cv2.imread(str(out / "b.png")).shape == (40, 56, 3)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_restore_exits_nonzero_with_the_count_when_images_are_skipped(tiny_bundle, photos, tmp_path, capsys,
                                                                     one_thread):
    data = (photos / "b.png").read_bytes()
    (photos / "c_truncated.png").write_bytes(data[: len(data) // 2])
    assert restore(tiny_bundle, photos, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "c_truncated.png" in err and "error: 1 of 3 images were skipped (see above); pass --allow-skipped" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert restore(tiny_bundle, photos, tmp_path / "out2", "--allow-skipped") == 0


def test_huge_image_is_refused_from_its_header_before_decoding(tiny_bundle, tmp_path, capsys, monkeypatch,
                                                              one_thread):
    src = tmp_path / "huge"
    src.mkdir()
    Image.new("L", (12000, 12000)).save(src / "huge.png")  # ~140 KB on disk, 144 MP when decoded
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.format) or real_load(im))
    assert restore(tiny_bundle, src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "huge.png: 12000x12000 = 144000000 pixels exceeds the limit of 50000000" in err
    assert decoded == []  # refused from the header: no pixel data was decoded (getexif included)


def test_max_pixels_above_pillows_own_cap(tiny_bundle, photos, tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses > 1000 px as a decompression bomb
    assert restore(tiny_bundle, photos, tmp_path / "out", "--max-pixels", "100000") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert Image.MAX_IMAGE_PIXELS == 500  # Pillow's own setting is put back
    assert restore(tiny_bundle, photos, tmp_path / "out2", "--max-pixels", "1000") == 1  # ours still applies
    assert "a.png: 56x40 = 2240 pixels exceeds the limit of 1000" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "a.png").exists()


def test_eval_name_cannot_leave_the_output_folder(tiny_bundle, photos, tmp_path, capsys, monkeypatch, one_thread):
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    rc = main(["eval", "--weights", tiny_bundle, "--clean", str(photos), "--synth", "noise:25", "--device", "cpu",
               "--name", "../../x", "--grid", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert one_line(err) == "error: --name '../../x' must be a plain file or folder name (no '/', '..' or leading '.')"
    assert snapshot(tmp_path) == before and not (tmp_path / "x").exists()


def test_eval_refuses_a_symlinked_summary(tiny_bundle, photos, tmp_path, capsys, one_thread):
    victim, link = tmp_path / "victim.md", tmp_path / "summary.md"
    victim.write_text("keep me\n")
    link.symlink_to(victim)
    rc = main(["eval", "--weights", tiny_bundle, "--clean", str(photos), "--synth", "noise:25", "--device", "cpu",
               "--out", str(tmp_path / "ev"), "--summary", str(link), "--grid", "0"])
    assert rc == 2
    assert f"{link} is a symbolic link" in one_line(capsys.readouterr().err)
    assert victim.read_text() == "keep me\n" and not (tmp_path / "ev").exists()


def test_tree_and_bundle_writes_refuse_symlinks_and_are_atomic(tmp_path, monkeypatch):
    tree = DegradationTree.fit(torch.randn(40, 4), [1, 2], seed=0)
    out, victim = tmp_path / "tree", tmp_path / "victim.json"
    out.mkdir()
    victim.write_text("{}")
    (out / "tree.json").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="tree.json is a symbolic link"):
        tree.save(out)
    assert victim.read_text() == "{}"
    (out / "tree.json").unlink()
    tree.save(out)
    before = snapshot(out)

    def broken_save(tensors, path):  # dies half-way through writing the new file
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("unirestorer.model.tree.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tree.save(out)
    assert snapshot(out) == before  # the old tree is intact, no temporary file left behind
    with pytest.raises(UnsafePathError, match="already exists"):
        atomic_write(out / "tree.json", "x", overwrite=False)
    with pytest.raises(RuntimeError):
        with atomic_path(out / "new.bin"):
            raise RuntimeError
    assert snapshot(out) == before


# ---------------------------------------------------------------- bundles


def edit_config(bundle: Path, change) -> None:
    config = json.loads((bundle / "bundle.json").read_text())
    change(config)
    (bundle / "bundle.json").write_text(json.dumps(config))


def edit_tensors(bundle: Path, change) -> None:
    tensors = load_file(str(bundle / "weights.safetensors"))
    change(tensors)
    save_file(tensors, str(bundle / "weights.safetensors"))


BAD_BUNDLES = {
    "hub backbone": (lambda b: edit_config(b, lambda c: c["extractor"].update(backbone="hf-hub:timm/resnet18.a1_in1k")),
                     "bundle.json: extractor.backbone: 'hf-hub:timm/resnet18.a1_in1k' is not a timm architecture"),
    "unknown key": (lambda b: edit_config(b, lambda c: c["router"].update(gate_temperature=2.0)),
                    "bundle.json: router: unknown key 'gate_temperature'"),
    "unknown top-level key": (lambda b: edit_config(b, lambda c: c.update(plugins=["x"])),
                              "bundle.json: unknown key 'plugins'"),
    "wrong type": (lambda b: edit_config(b, lambda c: c["experts"]["1"].update(width="8")),
                   "bundle.json: experts.1.width: \"8\" is not a valid int"),
    "missing tensor": (lambda b: edit_tensors(b, lambda t: t.pop("router.g_d.weight")),
                       "weights.safetensors: tensor 'router.g_d.weight' is missing"),
    "extra tensor": (lambda b: edit_tensors(b, lambda t: t.update({"payload.blob": torch.zeros(3)})),
                     "weights.safetensors: unexpected tensor 'payload.blob'"),
    "NaN weights": (lambda b: edit_tensors(b, lambda t: t["experts.0.ending.weight"].fill_(float("nan"))),
                    "weights.safetensors: tensor 'experts.0.ending.weight' holds NaN/Inf values"),
    "truncated weights": (lambda b: (b / "weights.safetensors").write_bytes(
        (b / "weights.safetensors").read_bytes()[:5000]), "weights.safetensors: not a readable safetensors file"),
    "not JSON": (lambda b: (b / "bundle.json").write_text('{"format": '), "bundle.json: not valid JSON"),
    # issue 20: bundles that loaded and then restored garbage, tracebacks, or asked for unbounded memory
    "integer conv weights": (lambda b: edit_tensors(b, lambda t: t.update({"experts.0.ending.weight": torch.ones_like(
        t["experts.0.ending.weight"], dtype=torch.int32)})),
        "tensor 'experts.0.ending.weight' has dtype torch.int32, the model expects torch.float32"),
    "zero crop size": (lambda b: edit_config(b, lambda c: c["extractor"].update(crop=0)),
                       "bundle.json: extractor.crop: 0 is outside 1..65536"),
    "deeply nested JSON": (lambda b: (b / "bundle.json").write_text(
        (b / "bundle.json").read_text()[:-1] + ', "source": ' + "[" * 50000 + "]" * 50000 + "}"),
        "bundle.json: JSON nested 50001 deep exceeds the limit of 64"),
    "router dim of tens of GB": (lambda b: edit_config(b, lambda c: c["router"].update(dim=65536)),
                                 "bundle.json: the model needs 160.0 GiB for its weights"),
    "experts of terabytes": (lambda b: edit_config(b, lambda c: [e.update(width=65536) for e in c["experts"].values()]),
                             "bundle.json: the model needs"),
    "leaf paths out of range": (lambda b: edit_tensors(b, lambda t: t["router.leaf_paths"].fill_(99)),
                                "tensor 'router.leaf_paths' is not the tree's root-to-leaf paths"),
    "all-false task mask": (lambda b: edit_tensors(b, lambda t: t["router.task_leaf_mask"].fill_(False)),
                            "weights.safetensors: task 'dark': its masks ('router.task_leaf_mask', "
                            "'router.task_node_mask') allow no leaf or not the root"),
    "constructor failure": (lambda b: edit_config(b, lambda c: c["experts"]["0"].update(name="restormer",
                                                                                       heads=[5, 5, 5, 5])),
                            "bundle.json: the model it describes cannot be built"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundle_is_refused_with_one_line(case, tiny_bundle, photos, tmp_path, capsys, one_thread):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    damage, expected = BAD_BUNDLES[case]
    damage(bundle)
    before = snapshot(tmp_path)
    assert restore(str(bundle), photos, tmp_path / "out") == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bundle}/") and expected in line, line
    assert snapshot(tmp_path) == before  # nothing written: no output folder, bundle untouched
