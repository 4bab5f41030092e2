"""Command-line client for dots-ocr-server: sends images and PDF pages to ``POST /ocr`` and writes
per-page results (``response.json``, ``layout.json``, ``page.md``, ``page.png``) plus a summary.

Run it as ``python scripts/ocr_client.py INPUT...`` or ``dots-ocr-client INPUT...``; see
``ocr_client.cli.main`` and docs/CLIENT.md.
"""
from .cli import main

__all__ = ["main"]
