"""`unirestorer serve --weights BUNDLE`: a browser app that restores one image and shows which expert did it, and why.

The page takes an uploaded file (kept byte for byte: a gr.File, never re-encoded) or an example, a mode
(`auto`, or one task: instruction mode), and restores it exactly as `unirestorer restore` does
(`restore.restore_tensor`, `image_io.save_picture`), so the download is the PNG `restore` writes. Beside
the before/after slider: the tree drawn small with the routed path, what each node holds, the leaf and
level probabilities (`explain.explanation`, from the model's own route), and the output of every node on
the path; clicking one makes it the result. Safety: it binds 127.0.0.1 unless told otherwise, never
shares publicly, bounds uploads, and keeps every file (Gradio's cache included) in one temporary folder
that is deleted on exit. `/restore` (image, mode) -> (restored image, explanation JSON) is its API.
"""


import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from unirestorer.arguments import COUNT, NON_NEGATIVE
from unirestorer.restore import DEFAULT_OVERLAP, DEFAULT_TILE, check_tiling, load_model

MAX_UPLOAD = "25mb"


def tree_svg(model, path: list[int], ran: int) -> str:
    """The tree, one row per level, the routed path in colour and the node that ran ringed."""
    from unirestorer.explain import holds

    tree, w, row = model.tree, 560, 56
    pos = {}
    for level, (start, size) in enumerate(zip(tree.level_starts, tree.level_sizes)):
        for i in range(size):
            pos[start + i] = ((i + 0.5) * w / size, 22 + level * row)
    parts = []
    for n, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            on = n in path and p in path
            (x1, y1), (x2, y2) = pos[p], pos[n]
            parts.append(f'<line x1="{x1:.0f}" y1="{y1}" x2="{x2:.0f}" y2="{y2}" stroke="{"#d9480f" if on else "#bbb"}" '
                         f'stroke-width="{3 if on else 1}"/>')
    for n, (x, y) in pos.items():
        h = holds(model, n)
        fill = "#d9480f" if n in path else "#e9ecef"
        ring = ' stroke="#1c7ed6" stroke-width="4"' if n == ran else ""
        label = (h["dominant"] or "?")[:5]
        parts.append(f'<g class="node" data-node="{n}"><title>node {n}: {h["composition"]}</title>'
                     f'<circle cx="{x:.0f}" cy="{y}" r="13" fill="{fill}"{ring}/>'
                     f'<text x="{x:.0f}" y="{y + 4}" font-size="10" text-anchor="middle">{n}</text>'
                     f'<text x="{x:.0f}" y="{y + 25}" font-size="9" text-anchor="middle">{label}</text></g>')
    height = 22 + (tree.n_levels - 1) * row + 34
    return (f'<svg id="tree" viewBox="0 0 {w} {height}" width="100%" xmlns="http://www.w3.org/2000/svg">'
            f'{"".join(parts)}</svg>')


def why_markdown(exp: dict) -> str:
    """The explanation as the page shows it: the chosen node, the path and what it holds, probabilities."""
    from unirestorer.explain import node_label

    lines = [f"**Restored by node {exp['ran']}** (router: level {exp['level']}, node {exp['node']}; "
             f"estimated leaf {exp['leaf']})", "", "| level | node | holds |", "|---|---|---|"]
    for n in exp["path"]:
        h = exp["holds"][str(n)]
        comp = ", ".join(f"{t} {c}" for t, c in h["composition"].items()) or "no labelled samples"
        lines.append(f"| {h['level']} | {node_label(n, h)} | {comp} |")
    lines += ["", "Leaf probabilities (top 3): " + ", ".join(f"leaf {k}: {p:.2f}" for k, p in exp["top_leaves"].items()),
              "", "Level probabilities: " + ", ".join(f"level {l}: {p:.2f}" for l, p in enumerate(exp["p_level"]))]
    return "\n".join(lines)


class Restorer:
    """The model and the work folder: restores one upload, keeps every path node's output for the gallery."""

    def __init__(self, model, work: Path, tile: int, overlap: int, max_pixels: int) -> None:
        self.model, self.work, self.tile, self.overlap, self.max_pixels = model, work, tile, overlap, max_pixels
        self.count = 0

    def restore(self, upload: str, mode: str, progress) -> tuple[str, dict, dict[int, str]]:
        """(restored file as `restore` writes it, explanation, {path node: its output file})."""
        import torch

        from unirestorer.data_shards.imageio import ImageReadError
        from unirestorer.image_io import load_picture, output_name, save_picture
        from unirestorer.restore import restore_tensor, run_expert

        src = Path(upload)
        try:
            pic = load_picture(src, self.max_pixels)
        except (ImageReadError, OSError) as err:
            raise ValueError(str(err)) from None
        x = torch.from_numpy(pic.rgb).permute(2, 0, 1)[None]
        self.count += 1
        folder = self.work / f"job{self.count}"
        folder.mkdir()
        progress(0, desc="routing")
        y, exp = restore_tensor(self.model, x, None if mode == "auto" else mode, self.tile, self.overlap)
        outputs = {}
        for i, n in enumerate(exp["path"]):
            progress((i + 1) / (len(exp["path"]) + 1), desc=f"node {n} (tiled {self.tile} px)")
            out = y if n == exp["ran"] else run_expert(self.model, n, x, self.tile, self.overlap)
            outputs[n] = str(folder / f"node{n}_{output_name(src)}")
            save_picture(outputs[n], out[0].permute(1, 2, 0).numpy(), pic)
        result = folder / output_name(src)
        save_picture(result, y[0].permute(1, 2, 0).numpy(), pic)
        progress(1, desc="done")
        return str(result), {"image": src.name, **exp}, outputs


def examples(folder: Path) -> list[str]:
    """Two degraded photos from scikit-image's bundled data (a noisy astronaut, a dark coffee cup)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    noisy = np.clip(data.astronaut()[64:320, 128:384] + rng.normal(0, 25, (256, 256, 3)), 0, 255)
    dark = data.coffee()[100:356, 150:406] * 0.15
    paths = []
    for name, img in (("noisy_astronaut.png", noisy), ("dark_coffee.png", dark)):
        paths.append(str(folder / name))
        Image.fromarray(img.astype(np.uint8)).save(paths[-1])
    return paths


def build_app(model, work: Path, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
              max_pixels: int | None = None):
    """The Gradio Blocks of the app (not launched)."""
    import gradio as gr

    from unirestorer.data_shards.imageio import DEFAULT_MAX_PIXELS

    engine = Restorer(model, work, tile, overlap, max_pixels or DEFAULT_MAX_PIXELS)
    sample_dir = work / "examples"
    sample_dir.mkdir()

    def restore_api(upload: str | None, mode: str, state: dict, progress=gr.Progress()):
        if not upload:
            raise gr.Error("upload an image first")
        try:
            result, exp, outputs = engine.restore(upload, mode, progress)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        record = json.loads(json.dumps(exp))  # what `restore --explain --json` writes (string keys)
        return result, record, {"upload": upload, "exp": exp, "outputs": outputs}

    def show(state: dict, node: int | None = None):
        exp, outputs = state["exp"], state["outputs"]
        node = exp["ran"] if node is None else node
        shown = {**exp, "ran": node}
        gallery = [(outputs[n], f"node {n} (level {exp['holds'][str(n)]['level']})") for n in exp["path"]]
        return ((state["upload"], outputs[node]), outputs[node], tree_svg(model, exp["path"], node),
                why_markdown(shown), gallery)

    def pick(state: dict, evt: gr.SelectData):
        return show(state, state["exp"]["path"][evt.index])

    with gr.Blocks(title="UniRestorer", delete_cache=(600, 3600)) as app:
        gr.Markdown("## UniRestorer: which expert restores your image, and why")
        state = gr.State({})
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                mode = gr.Dropdown(["auto", *model.router.task_names], value="auto", label="Mode",
                                   info="auto: the router decides; a task: restrict routing to it", elem_id="mode")
                run = gr.Button("Restore", variant="primary", elem_id="run")
                gr.Examples(examples(sample_dir), inputs=upload)
                tree = gr.HTML(label="Tree", elem_id="tree-view")
                why = gr.Markdown(elem_id="why")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id="slider")
                download = gr.DownloadButton("Download PNG", elem_id="download")
                gallery = gr.Gallery(label="Every node on the path (click one to make it the result)",
                                     columns=3, allow_preview=False, elem_id="path-outputs")
                result = gr.Image(label="Result", type="filepath", format="png", visible=False)
                explained = gr.JSON(label="Explanation", elem_id="explanation")
        views = [slider, download, tree, why, gallery]
        run.click(restore_api, [upload, mode, state], [result, explained, state], api_name="restore",
                  concurrency_limit=1).success(show, state, views, api_name=False)
        gallery.select(pick, state, views, api_name=False)
    return app


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="browser app: restore one image, see which expert and why")
    p.add_argument("--weights", required=True, metavar="BUNDLE", help="bundle folder (bundle.json + weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--tile", type=NON_NEGATIVE, default=DEFAULT_TILE,
                   help=f"tile size, 0 = whole image (default {DEFAULT_TILE})")
    p.add_argument("--overlap", type=NON_NEGATIVE, default=DEFAULT_OVERLAP,
                   help=f"tile overlap (default {DEFAULT_OVERLAP})")
    p.add_argument("--max-pixels", type=COUNT, default=None, help="refuse larger images (default 50M)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="unirestorer-serve-") as tmp:
        os.environ["GRADIO_TEMP_DIR"] = str(Path(tmp) / "gradio")  # uploads and outputs stay in `tmp`
        try:
            import gradio  # noqa: F401
        except ImportError:
            print("error: the app needs Gradio: pip install -e '.[app]'", file=sys.stderr)
            return 2
        try:
            model = load_model(args.weights, "cpu")
            check_tiling(model, args.tile, args.overlap)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        app = build_app(model, Path(tmp), args.tile, args.overlap, args.max_pixels)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through `with`: the folder is deleted
        app.queue().launch(server_name=args.host, server_port=args.port, share=False, max_file_size=MAX_UPLOAD,
                           show_error=True, allowed_paths=[tmp])
    return 0
