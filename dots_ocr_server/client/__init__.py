"""Command-line client for dots-ocr-server: sends images and PDF pages (rendered locally, one
image per page) to ``POST /ocr``, several pages in flight, and writes per-page results
(``response.json``, ``layout.json``, ``page.md``, ``page.png``) plus a summary.

Run it as ``python scripts/ocr_client.py INPUT...`` or ``dots-ocr-client INPUT...``; see
docs/CLIENT.md. Modules: ``inputs`` (files, folders, PDF pages -> uploads), ``http_client``
(``/health``, ``/ocr``, 429 retries), ``outputs`` (per-page files, resume marker, summary),
``batch`` (the pages in flight), ``documents`` (each input's document.md / document.json /
figures, docs/DOCUMENT_FORMAT.md), ``jobs`` (``--jobs``: each input as one document job on the
server, found again after a restart), ``jobs_api`` (the ``/jobs`` routes), ``job_results`` (a
job's result written as the per-page folders and the document), ``cli`` (the command line).
"""
from .cli import main

__all__ = ["main"]
