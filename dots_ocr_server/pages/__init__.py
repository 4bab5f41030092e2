"""The page service: one page through the model, the same way for every entry point.

A typed ``PageRequest`` in (where the page comes from, the prompt, the sampling, the limits, what
to post-process), a ``PageRun`` (its pieces as they are decoded) or a ``PageResult`` out. The
service owns loading the page, the bbox check, generation (``ModelRunner.start``), post-processing
with per-cell confidence, the statistics, the mapping of every failure to the one error type
(``dots_ocr_server.errors.RequestError``) and the metrics of every generation. ``/ocr``, ``/v1``,
``/inspect``, the UI's render, the batch job's actors and the document jobs are thin adapters
over it that only translate their protocol.

- ``request``  ``PageSource``, ``Postprocess``, ``PageRequest``
- ``result``   ``PageResult``: the answer, its statistics (Ollama's names), the post-processed fields
- ``service``  ``PageService`` (``load``, ``start``, ``run``, ``trace``) and ``PageRun``
"""
from .request import DEFAULT_PROMPT_TYPE, PageRequest, PageSource, Postprocess
from .result import DONE_REASONS, PageResult, done_reason
from .service import PageObserver, PageRun, PageService

__all__ = ["DEFAULT_PROMPT_TYPE", "PageRequest", "PageSource", "Postprocess", "PageResult", "DONE_REASONS",
           "done_reason", "PageObserver", "PageRun", "PageService"]
