"""``dots-ocr-eval compare``: the same pages, with the same options, answered by two setups (A
and B), and how far the answers agree: per page and in total.

A side is a running server (``/ocr`` or an OpenAI-compatible ``/v1``) or a folder of answers
saved earlier, in ``dots-ocr-client``'s layout (``<dir>/<input>/page_NNNN/response.json``, the
tokens in ``logprobs.json``): the client's own output folders, or what this command saves with
``--save-a`` / ``--save-b``. So a GPU can check its fast path against plain decoding with two
servers side by side, or with one server and a folder saved from the other, and bf16 against fp32.

Per page: identical text or not; the normalized edit distance of the two texts (Levenshtein
distance over the longer length: 0 identical, 1 nothing in common; rapidfuzz); where the two
token streams first part (token index, by id when both sides have ids, else by token text), and
the first differing character with a little context; for layout answers, the cells matched by
box IoU (at least ``--iou-match``), their mean IoU and the share of matched cells whose category
agrees.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dots_ocr_server.client.errors import PageError
from dots_ocr_server.client.outputs import LOGPROBS_NAME, MARKER_NAME, page_dir
from model_runner.prompts import LAYOUT_PROMPT_TYPES

from .drivers import Answer, Generation, Token
from .pages import Page
from .report import aligned_table, mean

__all__ = ["DEFAULT_IOU_MATCH", "SavedSide", "ServerSide", "compare_answers", "compare_layouts", "first_divergence",
           "match_cells", "run_compare", "save_answer", "summarize", "table_lines"]

DEFAULT_IOU_MATCH = 0.5
_CONTEXT_CHARS = 24


# ---------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------


class ServerSide:
    """Answers from a running server, through a driver (``drivers.make_driver``)."""

    def __init__(self, driver, save_to: Path | None = None):
        self.driver = driver
        self.save_to = save_to

    def describe(self) -> dict[str, Any]:
        return {**self.driver.describe(), "health": self.driver.health()}

    def answer(self, page: Page, gen: Generation) -> Answer:
        answer = self.driver.send(page.image(), gen)
        if self.save_to is not None:
            save_answer(self.save_to, page, answer, gen.prompt_type)
        return answer

    def close(self) -> None:
        self.driver.close()


class SavedSide:
    """Answers saved in ``folder`` (dots-ocr-client's layout)."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise PageError(f"no folder of saved answers at {folder}")
        self.folder = folder

    def describe(self) -> dict[str, Any]:
        return {"answers": str(self.folder)}

    def answer(self, page: Page, gen: Generation) -> Answer:
        directory = page_dir(self.folder, page.name, page.page)
        try:
            body = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
        except OSError:
            raise PageError(f"no saved answer in {directory}") from None
        except ValueError:
            raise PageError(f"{directory / MARKER_NAME} is not JSON") from None
        tokens = None
        logprobs = directory / LOGPROBS_NAME
        if logprobs.exists():
            try:
                entries = json.loads(logprobs.read_text(encoding="utf-8"))
            except ValueError:
                raise PageError(f"{logprobs} is not JSON") from None
            tokens = [(e.get("id"), e.get("token")) for e in entries if isinstance(e, dict)]
        return Answer(text=str(body.get("response") or ""), output_tokens=body.get("eval_count"),
                      prompt_tokens=body.get("prompt_eval_count"), finish_reason=body.get("done_reason"),
                      tokens=tokens, raw=body)

    def close(self) -> None:
        pass


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, ensure_ascii=False, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_answer(folder: Path, page: Page, answer: Answer, prompt_type: str) -> None:
    """``answer`` in dots-ocr-client's layout: the tokens in logprobs.json, then response.json
    (written last: it marks the page as saved)."""
    directory = page_dir(folder, page.name, page.page)
    if answer.tokens is not None:
        _write_json_atomic(directory / LOGPROBS_NAME, [{"id": i, "token": t} for i, t in answer.tokens])
    _write_json_atomic(directory / MARKER_NAME, {
        "response": answer.text, "prompt_type": prompt_type, "done_reason": answer.finish_reason,
        "eval_count": answer.output_tokens, "prompt_eval_count": answer.prompt_tokens})


# ---------------------------------------------------------------------------------------------
# One page
# ---------------------------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> float:
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_distance(a, b)


def _token_keys(a: list[Token], b: list[Token]) -> tuple[list[Any], list[Any]]:
    """Token ids when both sides have them all, else token texts."""
    if all(i is not None for i, _ in a) and all(i is not None for i, _ in b):
        return [i for i, _ in a], [i for i, _ in b]
    return [t for _, t in a], [t for _, t in b]


def first_divergence(a: Answer, b: Answer) -> dict[str, Any] | None:
    """Where the answers first differ (None when identical): the character, with context, and,
    when both sides carry their tokens, the token index and the two tokens there (None past the
    end of the shorter stream)."""
    keys = _token_keys(a.tokens, b.tokens) if a.tokens is not None and b.tokens is not None else None
    if a.text == b.text and (keys is None or keys[0] == keys[1]):
        return None
    char = len(os.path.commonprefix([a.text, b.text]))
    start = max(0, char - _CONTEXT_CHARS // 2)
    found: dict[str, Any] = {"char": char, "a_context": a.text[start:char + _CONTEXT_CHARS],
                             "b_context": b.text[start:char + _CONTEXT_CHARS]}
    if keys is not None:
        index = len(os.path.commonprefix(list(keys)))
        found["token"] = index
        found["a_token"] = a.tokens[index][1] if index < len(a.tokens) else None
        found["b_token"] = b.tokens[index][1] if index < len(b.tokens) else None
    return found


def iou(box_a: list[float], box_b: list[float]) -> float:
    ax1, ay1, ax2, ay2 = box_a
    bx1, by1, bx2, by2 = box_b
    width = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    height = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = width * height
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def match_cells(cells_a: list[dict], cells_b: list[dict], threshold: float) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, iou)`` of cells matched one to one, best IoU first, each at least
    ``threshold``. Greedy matching, the way detection benchmarks match boxes (written here: the
    optimal assignment would need scipy, and a page has a few dozen cells)."""
    pairs = []
    for i, cell_a in enumerate(cells_a):
        for j, cell_b in enumerate(cells_b):
            if cell_a.get("bbox") and cell_b.get("bbox"):
                overlap = iou(cell_a["bbox"], cell_b["bbox"])
                if overlap >= threshold:
                    pairs.append((overlap, i, j))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    used_a, used_b, matched = set(), set(), []
    for overlap, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matched.append((i, j, overlap))
    return matched


def compare_layouts(text_a: str, text_b: str, threshold: float) -> dict[str, Any]:
    """The two answers' layout cells (``layout.parse_layout``, model-input pixels on both sides)
    matched by IoU: counts, mean IoU of the matched pairs, category agreement among them."""
    from dots_ocr_server.layout import parse_layout

    cells_a, cells_b = parse_layout(text_a).cells, parse_layout(text_b).cells
    matched = match_cells(cells_a, cells_b, threshold)
    same = [cells_a[i].get("category") == cells_b[j].get("category") for i, j, _ in matched]
    return {"cells": [len(cells_a), len(cells_b)], "matched": len(matched),
            "ious": [round(o, 4) for _, _, o in matched], "mean_iou": mean([o for _, _, o in matched]),
            "same_category": sum(same), "category_agreement": sum(same) / len(same) if same else None}


def compare_answers(a: Answer, b: Answer, prompt_type: str, iou_match: float = DEFAULT_IOU_MATCH) -> dict[str, Any]:
    """One page's comparison (see the module docstring)."""
    divergence = first_divergence(a, b)
    result: dict[str, Any] = {
        "identical": divergence is None,
        "edit_distance": edit_distance(a.text, b.text),
        "chars": [len(a.text), len(b.text)],
        "tokens": [a.output_tokens, b.output_tokens],
        "finish_reasons": [a.finish_reason, b.finish_reason],
        "first_divergence": divergence,
    }
    if prompt_type in LAYOUT_PROMPT_TYPES:
        result["layout"] = compare_layouts(a.text, b.text, iou_match)
    return result


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_compare(pages: list[Page], side_a, side_b, gen: Generation, *, concurrency: int = 1,
                iou_match: float = DEFAULT_IOU_MATCH, progress: bool = True) -> list[dict[str, Any]]:
    """Each page from A then B (``concurrency`` pages in flight); one row per page, in order."""
    import sys

    from tqdm import tqdm

    from dots_ocr_server.client.batch import RunControl, run_pages

    def work(index: int) -> dict[str, Any]:
        page = pages[index]
        try:
            answers = side_a.answer(page, gen), side_b.answer(page, gen)
        except PageError as exc:
            return {"page": page.label, "error": str(exc)}
        finally:
            page.forget()
        return {"page": page.label, **compare_answers(*answers, gen.prompt_type, iou_match)}

    rows: list[dict[str, Any] | None] = [None] * len(pages)
    with tqdm(total=len(pages), unit="page", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for index, row in run_pages(list(range(len(pages))), work, concurrency, RunControl()):
            rows[index] = row
            bar.update(1)
    return [row for row in rows if row is not None]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the pages compared (rows without ``error``)."""
    compared = [r for r in rows if "error" not in r]
    layouts = [r["layout"] for r in compared if "layout" in r]
    ious = [o for layout in layouts for o in layout["ious"]]
    matched = sum(layout["matched"] for layout in layouts)
    divergences = [r["first_divergence"]["token"] for r in compared
                   if r["first_divergence"] and r["first_divergence"].get("token") is not None]
    totals: dict[str, Any] = {
        "pages": len(rows), "compared": len(compared), "failed": len(rows) - len(compared),
        "identical": sum(r["identical"] for r in compared),
        "mean_edit_distance": mean([r["edit_distance"] for r in compared]),
        "max_edit_distance": max((r["edit_distance"] for r in compared), default=None),
        "earliest_divergence_token": min(divergences, default=None),
    }
    if layouts:
        totals["layout"] = {
            "cells": [sum(x["cells"][0] for x in layouts), sum(x["cells"][1] for x in layouts)],
            "matched": matched, "mean_iou": mean(ious),
            "category_agreement": sum(x["same_category"] for x in layouts) / matched if matched else None}
    return totals


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _diverges(row: dict[str, Any]) -> str:
    found = row["first_divergence"]
    if found is None:
        return "-"
    return f"token {found['token']}" if found.get("token") is not None else f"char {found['char']}"


def table_lines(report: dict[str, Any]) -> list[str]:
    """The terminal table: one row per page, then the totals."""
    layout = any("layout" in r for r in report["pages"])
    header = ["page", "same", "edit dist", "diverges at", "chars A/B"] + (
        ["cells A/B", "matched", "IoU", "category"] if layout else [])
    rows = []
    for row in report["pages"]:
        if "error" in row:
            rows.append([row["page"], "FAILED", row["error"][:60]] + [""] * (len(header) - 3))
            continue
        cells = [row["page"], "yes" if row["identical"] else "no", _number(row["edit_distance"]), _diverges(row),
                 f"{row['chars'][0]}/{row['chars'][1]}"]
        if layout:
            x = row.get("layout") or {"cells": ["-", "-"], "matched": "-", "mean_iou": None,
                                      "category_agreement": None}
            cells += [f"{x['cells'][0]}/{x['cells'][1]}", str(x["matched"]), _number(x["mean_iou"]),
                      _number(x["category_agreement"], 2)]
        rows.append(cells)
    t = report["totals"]
    lines = [f"A: {_side_text(report['a'])}", f"B: {_side_text(report['b'])}", ""]
    lines += aligned_table(header, rows, left=1)
    lines += ["", (f"identical: {t['identical']} of {t['compared']} pages compared ({t['failed']} failed); "
                  f"mean edit distance {_number(t['mean_edit_distance'])}, max {_number(t['max_edit_distance'])}")]
    if t.get("earliest_divergence_token") is not None:
        lines.append(f"earliest divergence: token {t['earliest_divergence_token']}")
    if "layout" in t:
        x = t["layout"]
        lines.append(f"layout: {x['matched']} cells matched (A {x['cells'][0]}, B {x['cells'][1]}), "
                     f"mean IoU {_number(x['mean_iou'])}, category agreement {_number(x['category_agreement'], 2)}")
    return lines


def _side_text(side: dict[str, Any]) -> str:
    if "answers" in side:
        return f"saved answers in {side['answers']}"
    health = side.get("health") or {}
    bits = [f"{side['api']} {side['url']}"] + [f"{k} {health[k]}" for k in ("device", "dtype", "fast_path")
                                                if k in health]
    return ", ".join(bits)
