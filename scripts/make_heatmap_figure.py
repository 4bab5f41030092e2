"""Draw an attention heatmap with ``runner.trace`` on a sample page, for the README.

By default the model is the tiny checkpoint with RANDOM weights (built in a temporary folder),
because the real weights cannot be downloaded where this project is built; the picture then shows
what the tool draws, not where dots.ocr really looks, and says so in its title strip. With
``--model-path ./weights/DotsOCR`` it draws the real model's attention.

    python scripts/make_heatmap_figure.py                                  # tiny random weights
    python scripts/make_heatmap_figure.py --model-path ./weights/DotsOCR --device cuda --layers 20-27
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_range(text: str) -> list[int]:
    """"20-27" or "0,5,10" -> a list of ints."""
    out: list[int] = []
    for part in text.split(","):
        start, _, end = part.strip().partition("-")
        out.extend(range(int(start), int(end or start) + 1))
    return out


def overlay(page, grid, opacity: float = 0.65):
    """The page with ``grid`` ([rows, cols] attention) painted over it with a hot ramp, scaled from
    its minimum (transparent) to its maximum.

    The grid covers the whole page (the model input is the page resized), so it is stretched to
    the page size; nearest-neighbour keeps the token cells visible.
    """
    import numpy as np
    from PIL import Image

    values = np.asarray(grid, dtype=np.float32)
    values = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)  # min-max, as the UI does
    stops = np.array([[0, 0, 0], [190, 20, 20], [255, 200, 0], [255, 255, 230]], dtype=np.float32)
    position = values * (len(stops) - 1)
    low = np.minimum(position.astype(int), len(stops) - 2)
    fraction = (position - low)[..., None]
    colours = stops[low] * (1 - fraction) + stops[low + 1] * fraction  # [rows, cols, 3]
    alpha = (255 * opacity * values).astype(np.uint8)
    heat = Image.fromarray(np.dstack([colours.astype(np.uint8), alpha]), "RGBA")
    heat = heat.resize(page.size, Image.NEAREST)
    return Image.alpha_composite(page.convert("RGBA"), heat).convert("RGB")


def title_strip(image, lines: list[str]):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(12, image.width // 56))
    height = (font.size + 8) * len(lines) + 8
    out = Image.new("RGB", (image.width, image.height + height), "white")
    out.paste(image, (0, height))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((10, 6 + i * (font.size + 8)), line, fill=(20, 20, 20), font=font)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="checkpoint folder (default: a tiny RANDOM checkpoint)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", default=str(ROOT / "samples/demo_image1.jpg"))
    parser.add_argument("--prompt-type", default="prompt_layout_all_en")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--layers", help="e.g. 20-27 (default: all)")
    parser.add_argument("--span", default="8-24", help="answer tokens to average, e.g. 8-24 (inclusive)")
    parser.add_argument("--out", default=str(ROOT / "docs/figures/attention_heatmap.png"))
    args = parser.parse_args(argv)

    from PIL import Image

    from model_runner.runner import ModelRunner

    with tempfile.TemporaryDirectory() as scratch:
        random_weights = args.model_path is None
        model_path = args.model_path
        if random_weights:
            from model_runner.tiny import build_tiny_checkpoint

            model_path = build_tiny_checkpoint(Path(scratch) / "DotsOCR", seed=0)
        runner = ModelRunner(model_path, device=args.device, compile=False).load()
        page = Image.open(args.image).convert("RGB")
        first, last = parse_range(args.span)[0], parse_range(args.span)[-1]
        result = runner.trace(page, args.prompt_type, max_new_tokens=args.max_new_tokens,
                              layers=parse_range(args.layers) if args.layers else None, average_heads=True)
        last = min(last, len(result.token_ids) - 1)
        first = min(first, last)
        grid = result.heatmap(tokens=range(first, last + 1))

    drawn = overlay(page, grid.numpy())
    drawn.thumbnail((850, 1125))
    span_text = result.text[result.offsets[first][0]:result.offsets[last][1]].replace("\n", " ")
    layers = f"layers {result.layers[0]}-{result.layers[-1]}" if len(result.layers) > 1 else f"layer {result.layers[0]}"
    lines = [f"Attention of answer tokens {first}-{last} ({span_text[:40]!r}) to the page,",
             f"{layers}, mean of all heads; image-token grid {result.grid.rows} x {result.grid.cols}"]
    if random_weights:
        lines.insert(0, "TINY CHECKPOINT, RANDOM WEIGHTS: this shows the tool, not where dots.ocr looks")
    figure = title_strip(drawn, lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB): tokens {first}-{last}, {layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
