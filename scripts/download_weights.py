"""Download the released dots.ocr checkpoint into a local folder (default ./weights/DotsOCR).

    python scripts/download_weights.py [OUT_DIR] [--repo-id rednote-hilab/dots.ocr] [--revision REV]

Only the files the server reads are fetched (JSON configs, tokenizer files, safetensors); the
checkpoint's own Python files are skipped: this project never runs them. The folder name has no
dots on purpose (the upstream README asks for that, and it keeps every tool happy).
"""
from __future__ import annotations

import argparse
import sys

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "tokenizer*", "vocab*", "merges*"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="./weights/DotsOCR")
    parser.add_argument("--repo-id", default="rednote-hilab/dots.ocr")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)

    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id=args.repo_id, revision=args.revision, local_dir=args.out_dir,
                             allow_patterns=ALLOW_PATTERNS)
    print(f"dots.ocr weights in {path}\nstart the server with: python server.py --model-path {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
