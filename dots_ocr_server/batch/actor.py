"""``PageOcr``: the callable class the actor pool runs. One ``ModelRunner`` per actor, and the
server's page service over it (``dots_ocr_server.pages``): a page is loaded, generated and
post-processed (layout with per-cell confidence) exactly as ``/ocr`` does it.

How a batch runs: the batch's files are read once each (the pages of one PDF usually arrive
together), then one thread per page runs ``PageService.run`` at the same time as the others. The
runner was built with ``max_batch_size = batch_size``, so its engine decodes those pages in one
batch (continuous batching: a page that ends early frees its slot). Any failure of one page
(unreadable file, undecodable image, broken PDF page, model error) becomes that page's
``error``; the other pages and the job go on.

Ray is not imported here: the class is plain Python, so tests call it directly on a runner.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from image_utils.policy import DEFAULT_PDF_DPI
from model_runner.defaults import DEFAULT_MAX_NEW_TOKENS

from .inputs import read_source
from .outputs import output_schema, token_confidence

log = logging.getLogger(__name__)

__all__ = ["JobSettings", "PageOcr", "load_runner"]


@dataclass(frozen=True)
class JobSettings:
    """Everything an actor needs (sent to every actor, so plain values only)."""

    prompt_type: str = "prompt_layout_all_en"
    model_path: Optional[str] = None   # a checkpoint folder visible on every node
    demo: bool = False                 # each actor builds the tiny random checkpoint itself
    device: str = "cpu"                # "cpu" or "cuda" (one GPU per actor)
    dtype: str = "auto"
    batch_size: int = 4                # pages generated at once per actor (the runner's max_batch_size)
    cpus_per_actor: int = 1            # torch threads of a CPU actor
    dpi: float = float(DEFAULT_PDF_DPI)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: Optional[float] = None  # None: the prompt type's default (as the server does)
    seed: Optional[int] = None
    question: Optional[str] = None     # prompt_general only
    postprocess: bool = False
    logprobs: bool = False


def _demo_checkpoint() -> Path:
    """The tiny random checkpoint, built in this process's own temporary folder: on a cluster the
    driver's temporary folder is not visible to the actors, and building it takes seconds."""
    from model_runner.tiny import build_tiny_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="dots-ocr-batch-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return build_tiny_checkpoint(folder / "DotsOCR-tiny-random", seed=0)


def load_runner(settings: JobSettings):
    """A loaded ``ModelRunner`` for ``settings`` (the tiny checkpoint with ``demo``)."""
    import torch

    from model_runner.runner import ModelRunner

    if settings.device == "cpu":
        # Each CPU actor owns cpus_per_actor cores (its Ray reservation): without this, torch
        # would start one thread per core of the machine in every actor and they would fight.
        torch.set_num_threads(settings.cpus_per_actor)
    path = _demo_checkpoint() if settings.demo else Path(settings.model_path)
    runner = ModelRunner(path, device=settings.device, dtype=settings.dtype, max_batch_size=settings.batch_size,
                         max_new_tokens_limit=settings.max_new_tokens)
    return runner.load()


class PageOcr:
    """Ray Data callable class: a pyarrow batch of planned pages (key, source, sha256, kind,
    page, page_count) -> a pyarrow table of output rows (:func:`batch_job.outputs.output_schema`).
    ``runner``: an already loaded runner (tests); by default one is loaded from ``settings``."""

    def __init__(self, settings: JobSettings, runner=None):
        from model_runner.prompts import default_temperature

        from ..pages import PageService
        from .inputs import page_policy

        self.settings = settings
        self.runner = runner if runner is not None else load_runner(settings)
        self.pages = PageService(self.runner, page_policy())
        self.temperature = (settings.temperature if settings.temperature is not None
                            else default_temperature(settings.prompt_type))
        self.schema = output_schema(settings.postprocess, settings.logprobs)
        workers = max(1, int(self.runner.max_batch_size))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dots-ocr-page")

    def close(self) -> None:
        """Stop the page threads. Ray ends an actor with its process; a caller that made a
        ``PageOcr`` itself calls this when done with it."""
        self.pool.shutdown(wait=True)

    def __call__(self, batch):
        import pyarrow as pa

        pages = batch.to_pylist()
        files = self._read_files(pages)
        rows = list(self.pool.map(lambda page: self.ocr_page(page, files[page["source"]]), pages))
        return pa.Table.from_pylist(rows, schema=self.schema)

    @staticmethod
    def _read_files(pages: list[dict[str, Any]]) -> dict[str, Any]:
        """source -> its bytes, or the exception that reading it raised (read once per batch)."""
        files: dict[str, Any] = {}
        for page in pages:
            source = page["source"]
            if source not in files:
                try:
                    files[source] = read_source(source)
                except Exception as exc:  # noqa: BLE001 - becomes the error of this file's pages
                    files[source] = exc
        return files

    def ocr_page(self, page: dict[str, Any], data) -> dict[str, Any]:
        """One output row for one page; never raises."""
        started = time.perf_counter()
        row = {name: page.get(name) for name in ("key", "source", "sha256", "page", "page_count")}
        row["prompt_type"] = self.settings.prompt_type
        try:
            row.update(self._run(page, data))
        except _PageError as exc:
            row["error"] = str(exc)
        except Exception as exc:  # one bad page must not stop the batch
            log.exception("page %s of %s failed", page.get("page"), page.get("source"))
            row["error"] = f"generation failed: {type(exc).__name__}: {exc}"
        row["seconds"] = time.perf_counter() - started
        return row

    def page_request(self, page: dict[str, Any], data: bytes):
        """The page service's request for one planned page of a file's bytes."""
        from model_runner.decoding import DecodingOptions

        from ..pages import PageRequest, PageSource, Postprocess

        s = self.settings
        return PageRequest(source=PageSource(data=data, page=page["page"] if page["kind"] == "pdf" else 1,
                                             dpi=s.dpi if page["kind"] == "pdf" else None),
                           prompt_type=s.prompt_type, question=s.question,
                           decoding=DecodingOptions(temperature=self.temperature, seed=s.seed,
                                                    logprobs=0 if s.logprobs else None),
                           max_new_tokens=s.max_new_tokens, postprocess=Postprocess(layout=s.postprocess),
                           route="batch")

    def _run(self, page: dict[str, Any], data) -> dict[str, Any]:
        import json

        from ..errors import RequestError

        if isinstance(data, BaseException):
            raise _PageError(f"cannot read the file: {data}")
        try:
            result = self.pages.run(self.page_request(page, data))
        except RequestError as exc:
            what = "cannot load the page" if exc.field == "image" else "the model cannot run this page"
            raise _PageError(f"{what}: {exc.message}") from None
        stats, s = result.stats, self.settings
        out = {"response": result.text, "finish_reason": stats.finish_reason,
               "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens}
        if s.postprocess:
            processed = result.processed
            cells = processed.get("layout", processed.get("spots"))
            width, height = result.page.image.size
            out.update({"layout": None if cells is None else json.dumps(cells, ensure_ascii=False),
                        "markdown": processed.get("markdown", processed.get("svg")),
                        "repaired": processed.get("repaired"), "width": width, "height": height})
        if s.logprobs:
            out.update(_logprob_columns(result.tokens))
        return out


def _logprob_columns(tokens) -> dict[str, Any]:
    logprobs = [t.logprob for t in tokens if t.logprob is not None]
    low, mean = token_confidence(logprobs)
    return {"tokens": [t.text for t in tokens], "logprobs": [t.logprob for t in tokens],
            "min_token_prob": low, "mean_token_prob": mean}


class _PageError(Exception):
    """A page that cannot be done, with the message for its ``error`` column."""
