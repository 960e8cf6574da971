"""`unirestorer restore`: restore image files of any size with a weights bundle.

Routing is decided once per image, from the extractor's embedding of the whole image (its seeded
native-resolution crops, DESIGN §1.1); the chosen expert then runs tile by tile. Tiles overlap and
are blended with smooth weights (a raised-cosine ramp across each overlap that has a neighbour,
normalised by the summed weights), so no seams appear and a 4K photo fits a small GPU or a CPU.
The experts' pooled statistics (NAFNet's channel attention, Restormer's transposed attention) are
local at test time, over the training patch around each pixel (TLSC, model/local_stats.py), so a tile
computes what the whole image computes away from its border; `--tile 0` runs the image whole.

`--level L` runs the node at level L of the routed root→leaf path instead of the estimated level,
`--node N` any node; `--explain` prints why (unirestorer/explain.py), `--json` writes it beside the output.

Folders on several GPUs: `accelerate launch -m unirestorer.cli restore ...` splits the sorted file
list between processes (each image once); output names are the input names, so order and mapping
are kept whatever process wrote them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported inside the functions: `unirestorer --help` stays fast
    from torch import Tensor

DEFAULT_TILE, DEFAULT_OVERLAP = 512, 64


def ramp_window(size: int, rise_left: int, rise_right: int) -> Tensor:
    """1-D weights: raised-cosine rises of the given lengths at each end, 1 in between, > 0 everywhere."""
    import torch

    w = torch.ones(size)
    for n, sl in ((rise_left, slice(0, rise_left)), (rise_right, slice(size - rise_right, size))):
        if n:
            r = torch.sin(0.5 * math.pi * (torch.arange(n) + 0.5) / n) ** 2
            w[sl] = r if sl.start == 0 else r.flip(0)
    return w


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets covering [0, size): every `stride`, the last tile flush with the end."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, batch: int = 4,
          align: int = 1) -> Tensor:  # fmt: skip
    """fn applied to x [B,C,H,W] in overlapping tiles (tile 0: whole), blended without seams.

    `align` is the network's size multiple (its total downsampling): the image is replicate-padded
    to it, as the network itself pads, and tiles start on multiples of it, so every tile sees the
    same downsampling grid as the whole image does.
    """
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if tile <= 0 or (h <= tile and w <= tile):
        return fn(x)
    if tile % align or not 0 <= 2 * overlap <= tile:
        raise ValueError(f"tile {tile} must be a multiple of {align} and at least twice the overlap {overlap}")
    stride = max(align, (tile - overlap) // align * align)
    rise = tile - stride
    xp = F.pad(x, (0, -w % align, 0, -h % align), mode="replicate")
    hp, wp = xp.shape[-2:]
    th, tw = min(tile, hp), min(tile, wp)
    boxes = [(y, xx) for y in tile_starts(hp, th, stride) for xx in tile_starts(wp, tw, stride)]
    out = torch.zeros_like(xp)
    norm = xp.new_zeros(1, 1, hp, wp)
    for i in range(0, len(boxes), batch):
        part = boxes[i : i + batch]
        crops = torch.cat([xp[..., y : y + th, xx : xx + tw] for y, xx in part])
        ys = fn(crops).view(len(part), *x.shape[:2], th, tw)
        for (y, xx), yt in zip(part, ys):
            # rises only where a neighbouring tile overlaps; the image border keeps full weight
            wy = ramp_window(th, min(rise, y), min(rise, hp - y - th))
            wx = ramp_window(tw, min(rise, xx), min(rise, wp - xx - tw))
            weight = (wy[:, None] * wx[None, :]).to(x)
            out[..., y : y + th, xx : xx + tw] += yt * weight
            norm[..., y : y + th, xx : xx + tw] += weight
    return (out / norm)[..., :h, :w]


def route_image(model, x: Tensor, task: str | None = None):
    """The routing decision for x [1,3,H,W] from the embedding of the whole image (fp32 always: the
    extractor and the tree turn autocast off, and the router runs outside any)."""
    import torch

    with torch.inference_mode():
        return model.route(x, task)


def run_expert(model, node: int, x: Tensor, tile: int, overlap: int, batch: int = 4, bf16: bool = False) -> Tensor:
    """Expert `node` on x [1,3,H,W], tiled, clamped to [0, 1], fp32; `bf16`: the expert under bf16 autocast
    (weights stay fp32, normalisations and the blending too)."""
    import torch

    expert = model.expert(node)
    with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        out = tiled(expert, x, tile, overlap, batch, getattr(expert, "multiple", 1))
        return out.float().clamp_(0, 1)


def restore_tensor(model, x: Tensor, task: str | None = None, tile: int = DEFAULT_TILE,
                   overlap: int = DEFAULT_OVERLAP, batch: int = 4, bf16: bool = False, level: int | None = None,
                   node: int | None = None) -> tuple[Tensor, dict]:
    """x [1,3,H,W] in [0, 1] → (restored [1,3,H,W], the route as `UniRestorer.describe` gives it plus the node
    that ran and what the path's nodes hold); `level` / `node`: run that path level / node (explain.pick_node)."""
    from unirestorer.explain import explanation, pick_node

    info = model.describe(route_image(model, x, task), 0)
    ran = pick_node(info, level, node)
    return run_expert(model, ran, x, tile, overlap, batch, bf16), explanation(model, info, ran)


def check_tiling(model, tile: int, overlap: int) -> None:
    """Tiles must be a multiple of every expert's size multiple and hold two overlaps (tile 0: untiled)."""
    align = math.lcm(*(getattr(e, "multiple", 1) for e in model.experts.values()))
    if tile and (tile % align or not 0 <= 2 * overlap <= tile):
        raise ValueError(f"--tile {tile} must be a multiple of {align} (the experts' downsampling) "
                         f"and at least twice --overlap {overlap}")


def parse_level(value: str) -> int | None:
    """--level: 'auto' (None: the router's level) or a level number."""
    if value == "auto":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"--level {value!r}: expected auto or a level number 0, 1, 2, ...")
    return int(value)


def check_choice(model, level: int | None, node: int | None) -> None:
    """--level within the tree's levels, --node among its nodes (ValueError naming the range)."""
    if level is not None and level >= model.tree.n_levels:
        raise ValueError(f"--level {level}: this tree has levels 0..{model.tree.n_levels - 1}")
    if node is not None and not 0 <= node < model.tree.n_nodes:
        raise ValueError(f"--node {node}: this tree has nodes 0..{model.tree.n_nodes - 1}")


def sidecar(dest: Path) -> Path:
    """Where --json writes an output's explanation: beside it, its full name + .json."""
    return dest.with_name(dest.name + ".json")


def list_inputs(source: Path) -> tuple[list[Path], list[Path]]:
    """(the file itself, or the folder's regular non-hidden files in sorted order; the entries passed over)."""
    from unirestorer.data_shards.imageio import input_files

    if source.is_file():
        return [source], []
    if source.is_dir():
        return input_files(source)
    raise FileNotFoundError(f"--input {source}: no such file or folder")


def check_outputs(files: list[Path], source: Path, output: Path, overwrite: bool = False,
                  planned: list[Path] | None = None) -> list[Path]:
    """Output paths (or the `planned` ones: --json's sidecars); refuses (ValueError) any plan that would write
    over an input, through a symlink, or over an existing output (unless `overwrite`), before anything is written."""
    from unirestorer.image_io import output_name
    from unirestorer.safe_files import check_writable, output_folder

    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise ValueError(f"--output {output} must be a folder, not a symbolic link or a file")
    check_writable(output, "--output")
    out = output_folder(output)
    if source.is_dir() and out == source.resolve():
        raise ValueError(f"--output {output} is the input folder: restored files would overwrite the inputs")
    dests = [out / output_name(f) for f in files] if planned is None else planned
    links = [d for d in dests if d.is_symlink()]
    if links:
        raise ValueError(f"{links[0]} is a symbolic link; refusing to write through it")
    inputs = {f.resolve() for f in files}
    clash = [d for d in dests if d in inputs or (d.exists() and any(d.samefile(f) for f in files))]
    if clash:
        raise ValueError(f"refusing to overwrite input file {clash[0]} (choose another --output)")
    if len(set(dests)) != len(dests):
        raise ValueError("two inputs map to the same output name; restore them into separate folders")
    existing = [d for d in dests if d.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} already exists ({len(existing)} of the outputs do); pass --overwrite "
                         f"to replace them")
    return dests


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from unirestorer.arguments import COUNT, NON_NEGATIVE

    p = subparsers.add_parser("restore", help="restore image files with a weights bundle")
    p.add_argument("--weights", required=True, metavar="BUNDLE", help="bundle folder (bundle.json + weights)")
    p.add_argument("--input", required=True, type=Path, metavar="FILE|DIR")
    p.add_argument("--output", required=True, type=Path, metavar="DIR")
    p.add_argument("--task", default=None, help="instruction mode: restrict routing to this task's subtree")
    p.add_argument("--tile", type=NON_NEGATIVE, default=DEFAULT_TILE, help=f"tile size, 0 = whole image (default {DEFAULT_TILE})")
    p.add_argument("--overlap", type=NON_NEGATIVE, default=DEFAULT_OVERLAP, help=f"tile overlap (default {DEFAULT_OVERLAP})")
    p.add_argument("--tile-batch", type=COUNT, default=4, help="tiles per expert call (default 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--bf16", action="store_true", help="experts under bf16 autocast (routing stays fp32)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--level", type=parse_level, default=None, metavar="auto|0|1|2",
                        help="run this level's node of the routed path (default auto: the estimated level)")
    choice.add_argument("--node", type=int, default=None, metavar="N", help="run tree node N for every image")
    p.add_argument("--explain", action="store_true",
                   help="print each image's path, what its nodes hold, leaf and level probabilities, the node run")
    p.add_argument("--json", action="store_true", help="with --explain: also write OUTPUT.json beside each output")
    p.add_argument("--max-pixels", type=COUNT, default=None,
                   help="refuse larger images, from the header before decoding (default 50M; may exceed Pillow's cap)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--force", action="store_true",
                   help="write outputs that lose what their format cannot hold (16 bits or alpha in JPEG, a profile "
                        "in a 16-bit TIFF, animation frames after the first), with a warning (default: skip them)")
    p.add_argument("--allow-skipped", action="store_true",
                   help="exit 0 even if some input images were not restored: unreadable, too large, refused as lossy "
                        "or failed to write (default: exit 1 and name the count; hidden files are only counted)")
    p.set_defaults(func=run)


def load_model(weights: str, device):
    from unirestorer.model.unirestorer import UniRestorer

    return UniRestorer.load_bundle(weights, device=device).eval()


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm import tqdm

    from unirestorer.data_shards.imageio import DEFAULT_MAX_PIXELS, ImageReadError, passed_over_note
    from unirestorer.explain import explain_text
    from unirestorer.image_io import ImageWriteError, load_picture, losses, save_picture
    from unirestorer.safe_files import atomic_write, ensure_dir

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    try:
        if args.json and not args.explain:
            raise ValueError("--json writes --explain's record: pass --explain too")
        files, passed = list_inputs(args.input)
        dests = check_outputs(files, args.input, args.output, args.overwrite)
        if args.json:
            check_outputs(files, args.input, args.output, args.overwrite, [sidecar(d) for d in dests])
        if not files:
            raise ValueError(f"--input {args.input}: the folder has no files")
        model = load_model(args.weights, state.device)
        if args.task is not None and args.task not in model.router.task_names:
            raise ValueError(f"--task {args.task!r} unknown; this model knows {model.router.task_names}")
        check_tiling(model, args.tile, args.overlap)
        check_choice(model, args.level, args.node)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if passed and state.is_main_process:
        print(passed_over_note(args.input, passed), file=sys.stderr)
    ensure_dir(dests[0].parent)
    restored = 0
    # a write refused here (a symlink planted after the check) is an error for that image, never a follow
    with state.split_between_processes(list(zip(files, dests))) as mine:
        for src, dest in tqdm(mine, desc="restore", unit="img", disable=not state.is_local_main_process):
            try:
                pic = load_picture(src, args.max_pixels or DEFAULT_MAX_PIXELS)
                if lost := losses(pic, dest):
                    if not args.force:
                        raise ImageReadError(f"{src}: writing {dest.name} would lose {'; '.join(lost)}; pass --force "
                                             f"to accept that")
                    tqdm.write(f"warning: {dest.name}: lost {'; '.join(lost)} (--force)", file=sys.stderr)
                for note in pic.notes:
                    tqdm.write(f"note: {src.name}: {note}", file=sys.stderr)
                x = torch.from_numpy(pic.rgb).permute(2, 0, 1)[None].to(state.device)
                y, info = restore_tensor(model, x, args.task, args.tile, args.overlap, args.tile_batch, args.bf16,
                                         args.level, args.node)
                save_picture(dest, y[0].permute(1, 2, 0).float().cpu().numpy(), pic)
                if args.json:
                    atomic_write(sidecar(dest), json.dumps({"image": src.name, "output": dest.name, **info}, indent=1))
            except (ImageReadError, ImageWriteError, OSError) as err:
                tqdm.write(f"skipped: {err}", file=sys.stderr)
                continue
            restored += 1
            if args.explain:
                tqdm.write(explain_text(src.name, info))
    total = sum(gather_object([restored]))
    skipped = len(files) - total
    if state.is_main_process:
        print(f"restored {total} of {len(files)} images into {args.output}")
        if skipped:
            print(f"error: {skipped} of {len(files)} images were skipped (see above)"
                  + ("" if args.allow_skipped else "; pass --allow-skipped to accept that"), file=sys.stderr)
    return 0 if total and (not skipped or args.allow_skipped) else 1

