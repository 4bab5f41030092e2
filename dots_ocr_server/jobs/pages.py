"""One page of a job, between the store and the page service: the page request a job's options
make, the answer kept for a finished page (its layout in page pixels, as the document needs it),
whether that answer can be trusted (the document's own rule), and its pictures cropped at once."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from model_runner.decoding import DecodingOptions
from model_runner.prompts import POSTPROCESS_PROMPT_TYPES

from ..document.quality import ISSUE_REPETITION, answer_problem
from ..pages import PageRequest, PageResult, PageSource, Postprocess
from .store import JobRow

__all__ = ["page_request", "page_answer", "page_problem", "save_figures", "PROBLEM_MESSAGES"]

#: The reason a page failed, for each problem of its answer.
PROBLEM_MESSAGES = {ISSUE_REPETITION: "the answer looped (the repetition guard ended it)",
                    "unparsable_layout": "no layout could be read out of the answer, even after repair"}


def page_request(job: JobRow, page: int, data: bytes) -> PageRequest:
    """The page service's request for page ``page`` of ``job``'s stored document ``data``."""
    from .manager import JOB_ROUTE

    options = job.options
    prompt_type = options["prompt_type"]
    return PageRequest(
        source=PageSource(data=data, page=page if job.kind == "pdf" else 1, dpi=options.get("dpi")),
        prompt_type=prompt_type, question=options.get("prompt"),
        decoding=DecodingOptions(temperature=options["temperature"], top_p=options["top_p"], seed=options.get("seed")),
        max_new_tokens=options["max_new_tokens"],
        postprocess=Postprocess(layout=prompt_type in POSTPROCESS_PROMPT_TYPES), route=JOB_ROUTE)


def page_answer(result: PageResult, page_size: tuple[int, int]) -> dict[str, Any]:
    """What a job keeps of a page's answer: the text, how it ended and its statistics, and for
    the layout prompt types the cells (boxes in the pixels of the page as rendered, ``page_size``,
    also when the answer was for the page scaled down for a retry), Markdown and ``repaired``."""
    from ..layout import scale_cells

    answer: dict[str, Any] = {"width": page_size[0], "height": page_size[1], "response": result.text,
                              **result.statistics()}
    if result.request.postprocess.layout:
        processed = dict(result.processed)
        asked_size = result.page.image.size
        if processed.get("layout") and asked_size != page_size:
            processed["layout"] = scale_cells(processed["layout"], asked_size, page_size)
        answer.update(processed)  # layout, markdown, repaired (spots or the SVG for those prompt types)
    return answer


def page_problem(answer: dict[str, Any]) -> str | None:
    """Why a page's answer cannot be kept as it is (a loop, an unreadable layout), or None."""
    problem = answer_problem(answer)
    return None if problem is None else f"{problem}: {PROBLEM_MESSAGES.get(problem, problem)}"


def save_figures(folder: Path, page: int, answer: dict[str, Any], image) -> list[str]:
    """Crop the page's pictures from ``image`` (the page at its full resolution) into ``folder``,
    named as the document names them (``page-<n>-fig-<k>.png``); the names written."""
    from ..document import page_figures
    from ..document.figures import figure_png
    from ..document.inputs import page_from_answer
    from ..document.writer import write_bytes_atomic

    if not answer.get("layout"):
        return []
    page_input = page_from_answer(page, answer["width"], answer["height"], answer)
    names = []
    for figure in page_figures(page_input):
        name = Path(figure.file).name
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / name, figure_png(image, figure, page_input))
        names.append(name)
    return names
