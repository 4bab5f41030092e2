"""``dots-ocr-batch`` end to end on a real local Ray (2 CPUs, started once for the module), tiny
random checkpoint (``--demo``), 2 CPU actors: samples/ (3 images and a 2-page PDF) plus a corrupt
file, then a rerun that skips everything. The parts, and the command line's other paths (--force,
--retry-failed, JSONL, --logprobs), are tested without Ray in test_batch_job.py."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from dots_ocr_server.batch import cli
from dots_ocr_server.batch.outputs import SUMMARY_NAME
from dots_ocr_server.batch.pipeline import local_runtime_env

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
FAST = ["--demo", "--device", "cpu", "--dpi", "36", "--max-new-tokens", "6", "--seed", "0"]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=local_runtime_env(), logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, monkeypatch_module):
    """The first run: its output folder, exit code and printed summary."""
    monkeypatch_module.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path_factory.mktemp("batch")
    corrupt = root / "scan-0042.png"
    corrupt.write_bytes((SAMPLES / "demo_image2.png").read_bytes()[:4000])
    out = root / "out"
    code = cli.main([str(SAMPLES), str(corrupt), "--out", str(out), "--actors", "2", "--postprocess", *FAST])
    return {"out": out, "code": code, "corrupt": corrupt}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_page_becomes_a_row_and_the_corrupt_file_an_error_row(job):
    assert job["code"] == cli.EXIT_FAILED  # one page failed
    table = pq.read_table(job["out"])
    rows = sorted(table.to_pylist(), key=lambda r: (Path(r["source"]).name, r["page"]))
    assert [(Path(r["source"]).name, r["page"], r["page_count"]) for r in rows] == [
        ("demo_image1.jpg", 1, 1), ("demo_image2.png", 1, 1), ("demo_image3.jpg", 1, 1),
        ("demo_pdf1.pdf", 1, 2), ("demo_pdf1.pdf", 2, 2), ("scan-0042.png", 1, 1)]
    ok, bad = rows[:5], rows[5]
    assert all(r["error"] is None and r["finish_reason"] in ("eos", "length") for r in ok)
    assert all(r["prompt_type"] == "prompt_layout_all_en" and 1 <= r["new_tokens"] <= 6 for r in ok)
    assert bad["error"].startswith("cannot load the page") and bad["response"] is None
    # --postprocess: the server's layout code filled layout and markdown
    assert all(isinstance(json.loads(r["layout"]), list) and r["markdown"] is not None for r in ok)
    summary = json.loads((job["out"] / SUMMARY_NAME).read_text())
    assert (summary["pages_ok"], summary["pages_failed"], summary["pages_skipped"]) == (5, 1, 0)
    assert summary["actors"] == 2 and summary["pages_per_second"] > 0


def test_a_rerun_skips_every_written_page(job):
    shards = sorted(p.name for p in job["out"].glob("part-*"))
    code = cli.main([str(SAMPLES), str(job["corrupt"]), "--out", str(job["out"]), "--actors", "2",
                     "--postprocess", *FAST])
    assert code == cli.EXIT_OK
    assert sorted(p.name for p in job["out"].glob("part-*")) == shards  # nothing new written
    summary = json.loads((job["out"] / SUMMARY_NAME).read_text())
    assert (summary["pages_ok"], summary["pages_failed"], summary["pages_skipped"]) == (0, 0, 6)
