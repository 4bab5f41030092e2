"""Download a released checkpoint into a local folder (default: rednote-hilab/dots.ocr into ./weights/DotsOCR).

    python scripts/download_weights.py [OUT_DIR] [--repo-id REPO] [--revision REV]

REPO is a Hub repo id: rednote-hilab/dots.ocr (the default), rednote-hilab/dots.mocr or
rednote-hilab/dots.mocr-svg (dots.ocr 1.5), or any other owner/name folder of the same layout (a
fine-tune). Without OUT_DIR the folder is ./weights/<name>: DotsOCR, DotsMOCR, DotsMOCR-SVG for the
three releases, else the repo name with its dots removed. The folder name has no dots on purpose (the
upstream README asks for that, and it keeps every tool happy).

Only the files the server reads are fetched (JSON configs, tokenizer files, safetensors); the
checkpoint's own Python files are skipped: this project never runs them.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "tokenizer*", "vocab*", "merges*"]
DEFAULT_REPO_ID = "rednote-hilab/dots.ocr"
WEIGHTS_ROOT = Path("./weights")
#: The released checkpoints and their folder names (as in the upstream READMEs, without dots).
KNOWN_REPOS = {
    "rednote-hilab/dots.ocr": "DotsOCR",
    "rednote-hilab/dots.mocr": "DotsMOCR",
    "rednote-hilab/dots.mocr-svg": "DotsMOCR-SVG",
}
# The Hub's repo id shape: owner/name, letters, digits, "-", "_" and "." (no "..", no leading dot).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def repo_id_arg(value: str) -> str:
    """argparse type: a Hub repo id ``owner/name``."""
    value = value.strip()
    if not _REPO_ID.match(value) or ".." in value:
        raise argparse.ArgumentTypeError(f"not a Hub repo id (owner/name): {value!r}")
    return value


def default_out_dir(repo_id: str) -> Path:
    """./weights/<folder> for ``repo_id``: the released checkpoints' names, else the repo name with
    its dots removed."""
    name = KNOWN_REPOS.get(repo_id) or repo_id.split("/", 1)[1].replace(".", "")
    return WEIGHTS_ROOT / name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, default=None,
                        help="target folder (default ./weights/<name for the repo>)")
    parser.add_argument("--repo-id", type=repo_id_arg, default=DEFAULT_REPO_ID,
                        help=f"Hub repo id (default {DEFAULT_REPO_ID}; also {', '.join(list(KNOWN_REPOS)[1:])})")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: the main branch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir if args.out_dir is not None else default_out_dir(args.repo_id)

    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id=args.repo_id, revision=args.revision, local_dir=str(out_dir),
                             allow_patterns=ALLOW_PATTERNS)
    print(f"{args.repo_id} weights in {path}\nstart the server with: python server.py --model-path {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
