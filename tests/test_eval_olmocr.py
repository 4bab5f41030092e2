"""dots-ocr-eval olmocr-bench on a small bench folder made here (three one-page PDFs from the
samples; tests of the kinds present, absent, order, table), scored by the official scorer
(olmocr[bench]): an oracle written from the tests' own texts scores 100%, one that breaks two
tests scores exactly what it satisfies; end to end against a demo server, the Markdown files are
the server's own Markdown of each page, through /ocr and through /v1 alike."""
import importlib.util
import json

import pytest
import requests
from eval_support import (
    BENCH_PDFS,
    BROKEN_ORACLE,
    MATH_MARKDOWN,
    ORACLE,
    demo_server,
    make_bench_folder,
    write_candidate,
)

from dots_ocr_server.eval import cli, olmocr_bench

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker

E2E = ["--dpi", "50", "--max-new-tokens", "24", "--temperature", "0", "--no-progress", "--bootstrap-samples", "50"]
TYPES = {"present": 2, "absent": 1, "order": 1, "table": 1, "baseline": 3}  # one baseline test per PDF


@pytest.fixture()
def bench(tmp_path):
    return make_bench_folder(tmp_path / "bench")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    with demo_server(tiny_ckpt, tmp_path_factory.mktemp("olmocr")) as running:
        yield running


def _score_only(bench, name, capsys):
    code = cli.main(["olmocr-bench", str(bench), "--score-only", "--name", name, "--bootstrap-samples", "50"])
    report = json.loads((bench / name / "report.json").read_text())
    return code, report, capsys.readouterr().out


def test_the_oracle_scores_100_percent_through_the_official_scorer(bench, capsys):
    write_candidate(bench, "oracle", ORACLE)
    code, report, printed = _score_only(bench, "oracle", capsys)
    assert code == 0
    assert report["score"] == 100.0 and report["ci95"] == [100.0, 100.0] and report["tests"] == 8
    assert {kind: v["tests"] for kind, v in report["by_test_type"].items()} == TYPES
    assert all(v["score"] == 100.0 for v in report["by_test_type"].values())
    assert report["failed_tests"] == [] and report["errors"] == []
    assert report["by_test_file"]["text.jsonl"] == {"score": 100.0, "passed": 4, "total": 4}
    assert report["scorer"]["olmocr"] and "olmocr.bench.benchmark" in report["scorer"]["command"]
    assert "100.0%" in printed and (bench / "oracle" / "scorer.log").exists()


def test_a_broken_oracle_scores_what_it_satisfies(bench, capsys):
    write_candidate(bench, "broken", BROKEN_ORACLE)
    code, report, _ = _score_only(bench, "broken", capsys)
    assert code == 0
    # per test file: text.jsonl 2/4, tables.jsonl 1/1, baseline 3/3 -> (50 + 100 + 100) / 3
    assert report["score"] == 83.3
    assert report["by_test_type"]["order"]["score"] == 0.0 and report["by_test_type"]["absent"]["score"] == 0.0
    assert report["by_test_type"]["present"]["score"] == 100.0 and report["by_test_type"]["table"]["score"] == 100.0
    assert sorted(report["failed_tests"]) == ["p1_absent", "p1_order"]
    low, high = report["ci95"]
    assert low <= 83.3 <= high and low < high  # the bootstrap resamples text.jsonl's mixed results


def test_a_missing_page_leaves_the_candidate_unscored(bench, capsys):
    write_candidate(bench, "partial", {k: v for k, v in ORACLE.items() if k != "chart.pdf"})
    code, report, printed = _score_only(bench, "partial", capsys)
    assert code == 1 and report["score"] is None
    assert any("chart.pdf" in error for error in report["errors"]) and "no score" in printed


def test_end_to_end_against_the_demo_server(server, bench, capsys):
    code = cli.main(["olmocr-bench", str(bench), "--server", server.url, *E2E, "--label", "tiny demo"])
    report = json.loads((bench / "dots_ocr_server" / "report.json").read_text())
    assert code == 0, report
    assert isinstance(report["score"], float) and 0 <= report["score"] <= 100 and report["tests"] == 8
    assert {kind: v["tests"] for kind, v in report["by_test_type"].items()} == TYPES
    settings = report["settings"]
    assert (settings["api"], settings["dpi"], settings["prompt_type"], settings["label"]) == (
        "ocr", 50, "prompt_layout_all_en", "tiny demo")
    assert settings["health"]["dtype"] == "float32" and settings["skip_headers_footers"] is True
    assert report["predictions"]["written"] == 3 and report["predictions"]["failed"] == []
    for pdf in BENCH_PDFS:  # each file holds the server's own Markdown of that page
        body = {"image": str(bench / "pdfs" / pdf), "image_format": "path", "page": 1, "dpi": 50,
                "prompt_type": "prompt_layout_all_en", "temperature": 0, "max_new_tokens": 24,
                "postprocess": True, "skip_headers_footers": True}
        markdown = requests.post(server.url + "/ocr", json=body, timeout=120).json()["markdown"]
        written = (bench / "dots_ocr_server" / f"{pdf.removesuffix('.pdf')}_pg1_repeat1.md").read_text()
        assert written == markdown.rstrip("\n") + "\n"
    assert "olmOCR-bench, candidate dots_ocr_server" in capsys.readouterr().out


def test_predictions_resume_and_v1_writes_the_same_markdown(server, bench, capsys):
    args = ["olmocr-bench", str(bench), "--server", server.url, *E2E, "--predictions-only"]
    assert cli.main([*args, "--name", "by_ocr"]) == 0
    first = {p: p.read_text() for p in (bench / "by_ocr").rglob("*.md")}
    assert len(first) == 3 and not (bench / "by_ocr" / "scorer.log").exists()
    assert cli.main([*args, "--name", "by_ocr"]) == 0  # a second run keeps what is written
    assert json.loads((bench / "by_ocr" / "report.json").read_text())["predictions"]["kept"] == 3
    assert cli.main([*args, "--name", "by_v1", "--api", "openai"]) == 0
    by_v1 = {p.relative_to(bench / "by_v1"): p.read_text() for p in (bench / "by_v1").rglob("*.md")}
    assert by_v1 == {p.relative_to(bench / "by_ocr"): text for p, text in first.items()}
    assert cli.main(["olmocr-bench", str(bench), "--score-only", "--name", "by_v1", "--bootstrap-samples", "50"]) == 0
    report = json.loads((bench / "by_v1" / "report.json").read_text())
    assert report["settings"]["api"] == "openai" and report["tests"] == 8  # settings kept from the predictions


def _chromium() -> str:
    """The browser the /ui tests use (tests/ui_browser_support.py's rule)."""
    from ui_browser_support import chromium_executable

    executable = chromium_executable()
    assert executable, "the math test needs Chromium: `sudo apt-get install chromium` (or set DOTS_OCR_CHROMIUM)"
    return executable


def test_math_tests_render_with_the_named_chromium_offline(tmp_path, monkeypatch, capsys):
    browser = _chromium()
    # a fresh home: no equation cache of olmocr's and no browser downloaded by Playwright
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PLAYWRIGHT_BROWSERS_PATH", raising=False)
    monkeypatch.delenv("DOTS_OCR_CHROMIUM", raising=False)
    bench = make_bench_folder(tmp_path / "bench", math=True)
    write_candidate(bench, "oracle", {**ORACLE, "chart.pdf": ORACLE["chart.pdf"] + "\n\n" + MATH_MARKDOWN})
    assert cli.main(["olmocr-bench", str(bench), "--score-only", "--name", "oracle"]) == 2
    assert "playwright install chromium" in capsys.readouterr().err
    assert cli.main(["olmocr-bench", str(bench), "--score-only", "--name", "oracle", "--chromium", browser,
                     "--bootstrap-samples", "50"]) == 0
    report = json.loads((bench / "oracle" / "report.json").read_text())
    assert report["by_test_type"]["math"] == {"score": 100.0, "tests": 1} and report["score"] == 100.0
    assert report["scorer"]["command"][2] == "dots_ocr_server.eval.scorer_main"


def test_a_missing_scorer_names_the_extra(bench, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmocr" else real(name, *a))
    assert olmocr_bench.scorer_missing() == ["olmocr"]
    assert cli.main(["olmocr-bench", str(bench), "--score-only"]) == 2
    assert "dots-ocr-server[eval]" in capsys.readouterr().err
