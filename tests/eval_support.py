"""Support for the dots-ocr-eval tests: a small olmOCR-bench folder made from the samples (three
one-page PDFs, test files of the kinds present, absent, order and table), Markdown written from
the tests' own texts (an oracle that satisfies every test, and one that breaks two), demo servers,
and reading /metrics."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import requests
from serverproc import ROOT, running_server_process

SAMPLES = ROOT / "samples"

# pdf (relative to pdfs/) -> how it is made: (sample file, page) ; one page each, one in a subfolder
BENCH_PDFS = {
    "docs/report_p1.pdf": ("demo_pdf1.pdf", 1),
    "report_p2.pdf": ("demo_pdf1.pdf", 2),
    "chart.pdf": ("demo_image2.png", 1),
}

TEXT_TESTS = [
    {"pdf": "docs/report_p1.pdf", "page": 1, "id": "p1_present", "type": "present", "text": "The quick brown fox"},
    {"pdf": "docs/report_p1.pdf", "page": 1, "id": "p1_absent", "type": "absent", "text": "CONFIDENTIAL DRAFT"},
    {"pdf": "docs/report_p1.pdf", "page": 1, "id": "p1_order", "type": "order", "before": "Introduction",
     "after": "Conclusion"},
    {"pdf": "report_p2.pdf", "page": 1, "id": "p2_present", "type": "present", "text": "second page text",
     "case_sensitive": False},
]
TABLE_TESTS = [
    {"pdf": "chart.pdf", "page": 1, "id": "chart_table", "type": "table", "cell": "42", "up": "Value",
     "left": "Answer", "top_heading": "Value"},
]

MATH_TESTS = [{"pdf": "chart.pdf", "page": 1, "id": "chart_math", "type": "math", "math": "a^2 + b^2 = c^2"}]
MATH_MARKDOWN = "$$a^{2}+b^{2}=c^{2}$$"  # not the same string: the scorer compares the KaTeX renders

TABLE_HTML = ("<table><tr><th>Name</th><th>Value</th></tr>"
              "<tr><td>Answer</td><td>42</td></tr></table>")

#: Markdown that satisfies every test above (and the scorer's baseline checks).
ORACLE = {
    "docs/report_p1.pdf": "# Introduction\n\nThe quick brown fox jumps over the lazy dog.\n\n## Conclusion\n\nDone.",
    "report_p2.pdf": "This is the Second Page Text of the report.",
    "chart.pdf": f"Results\n\n{TABLE_HTML}",
}
#: The same, with the order reversed and the absent text present on the first page.
BROKEN_ORACLE = {
    **ORACLE,
    "docs/report_p1.pdf": "## Conclusion\n\nCONFIDENTIAL DRAFT\n\n# Introduction\n\nThe quick brown fox jumps.",
}


def _one_page_pdf(sample: str, page: int, target: Path) -> None:
    import pypdfium2
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    source = SAMPLES / sample
    if source.suffix == ".pdf":
        document = pypdfium2.PdfDocument(source)
        single = pypdfium2.PdfDocument.new()
        single.import_pages(document, [page - 1])
        single.save(target)
        single.close()
        document.close()
    else:  # an image becomes a page of its size in points (72 dpi)
        Image.open(source).convert("RGB").save(target, format="PDF", resolution=72.0)


def make_bench_folder(folder: Path, math: bool = False) -> Path:
    """The bench folder: pdfs/ and two test files (text.jsonl, tables.jsonl), with ``math`` a
    third (math.jsonl)."""
    for pdf, (sample, page) in BENCH_PDFS.items():
        _one_page_pdf(sample, page, folder / "pdfs" / pdf)
    files = [("text.jsonl", TEXT_TESTS), ("tables.jsonl", TABLE_TESTS)] + ([("math.jsonl", MATH_TESTS)] if math else [])
    for name, tests in files:
        (folder / name).write_text("".join(json.dumps(test) + "\n" for test in tests))
    return folder


def write_candidate(folder: Path, name: str, markdown: dict[str, str]) -> None:
    """Markdown per pdf where the scorer reads it (page 1, repeat 1)."""
    for pdf, text in markdown.items():
        target = folder / name / f"{pdf.removesuffix('.pdf')}_pg1_repeat1.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")


@contextlib.contextmanager
def demo_server(ckpt: Path, tmp_path: Path, *args: str) -> Iterator:
    """A real server on ``ckpt`` (CPU), for the eval tool to drive."""
    with running_server_process(ckpt, "--threads", "8", *args, log_dir=tmp_path) as server:
        yield server


def scrape(url: str) -> dict[str, float]:
    """{metric sample name: value summed over its labels} of one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    text = requests.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def scrape_labelled(url: str, name: str, **labels: str) -> float:
    """The value of ``name`` at exactly ``labels`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
