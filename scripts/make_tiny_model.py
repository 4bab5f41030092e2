#!/usr/bin/env python
"""Write a tiny random dots.ocr checkpoint (official file layout, random weights) for tests and smoke runs.

Usage: python scripts/make_tiny_model.py OUT_DIR [--seed N] [--shards K] [--family dots.ocr|dots.mocr]

--family dots.mocr writes the layout of the dots.mocr / dots.mocr-svg checkpoints (dots.ocr 1.5).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    from model_runner.tiny import FAMILIES, build_tiny_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--shards", type=int, default=2, help="number of safetensors shards; 1 = model.safetensors")
    parser.add_argument("--family", choices=FAMILIES, default="dots.ocr",
                        help="which released checkpoint's file layout to write (default dots.ocr)")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be >= 1")

    out = build_tiny_checkpoint(args.out_dir, seed=args.seed, shards=args.shards, family=args.family)
    config = json.loads((out / "config.json").read_text())
    vision = config["vision_config"]
    print(f"tiny {args.family} checkpoint written to {out} (seed {args.seed}, {args.shards} shard(s))")
    print(
        f"  LLM: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads, vocab {config['vocab_size']}; "
        f"vision: width {vision['embed_dim']}, {vision['num_hidden_layers']} blocks; "
        f"image_token_id {config['image_token_id']}"
    )
    for path in sorted(out.iterdir()):
        print(f"  {path.name:40s} {path.stat().st_size:>10,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
