"""Draw docs/figures/demo_image1.layout.json on samples/demo_image1.jpg with the same function the
client uses for page.png, and save a reduced copy for the README.

The layout JSON is HAND-WRITTEN (boxes traced on the page by a person), because the real weights
cannot be downloaded where this project is built and the demo model's random weights produce no
meaningful layout. With the real weights, `dots-ocr-client` writes this kind of picture from the
model's own answer.

    python scripts/make_readme_figure.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from PIL import Image

    from dots_ocr_server.layout import draw_layout

    cells = json.loads((ROOT / "docs/figures/demo_image1.layout.json").read_text())
    page = Image.open(ROOT / "samples/demo_image1.jpg")
    drawn = draw_layout(page, cells)
    drawn.thumbnail((850, 1125))
    out = ROOT / "docs/figures/demo_image1_annotated.png"
    drawn.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
