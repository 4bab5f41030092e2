"""``dots-ocr-batch``: OCR a corpus of images and PDFs on Ray, from one workstation to a cluster.

Modules, in the order a run uses them:

- ``inputs``   INPUT arguments (files, folders, globs; local or fsspec URIs) -> source files; one
               file -> its content hash, kind and page count; page keys; loading one page's image
- ``outputs``  the output schema, Parquet / JSONL shards under ``--out``, what is already done
               (resume), replacing superseded rows, the summary
- ``actor``    ``PageOcr``: one ``ModelRunner`` per actor, a batch of pages generated together
- ``pipeline`` Ray: ``ray.init``, the scan stage and the actor pool (Ray Data ``map_batches``)
- ``cli``      the command line

Nothing here imports Ray at import time: the unit tests (inputs, keys, resume, error rows) run
without it, and a missing Ray is reported by the command line with the install command.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """The ``dots-ocr-batch`` entry point (see :mod:`batch_job.cli`)."""
    from .cli import main as cli_main

    return cli_main(argv)
