"""The Ray batch job's parts, without Ray: input expansion, scanning, page keys and planning,
shards and resume, the actor's rows (ok, error, concurrent generation) and the command line's
early exits. The Ray end-to-end runs are in test_batch_ray.py."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dots_ocr_server.batch import cli
from dots_ocr_server.batch.actor import JobSettings, PageOcr
from dots_ocr_server.batch.inputs import expand_inputs, page_key, page_policy, plan_pages, scan_source
from dots_ocr_server.batch.outputs import ShardWriter, drop_superseded, output_columns, read_written, shard_files

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CORRUPT = (SAMPLES / "demo_image2.png").read_bytes()[:4000]  # a PNG header, then truncated pixel data
BROKEN_PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\nthis is not a PDF body\n"


@pytest.fixture()
def corpus(tmp_path):
    """tmp/docs: the 3 sample images, the 2-page sample PDF, a corrupt PNG, a file that is no
    image, a broken PDF, a hidden file and a sub-folder."""
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for name in ("demo_image1.jpg", "demo_image3.jpg", "demo_pdf1.pdf"):
        shutil.copy(SAMPLES / name, docs / name)
    shutil.copy(SAMPLES / "demo_image2.png", docs / "sub" / "demo_image2.png")
    (docs / "corrupt.png").write_bytes(CORRUPT)
    (docs / "notes.png").write_bytes(b"just some text")
    (docs / "broken.pdf").write_bytes(BROKEN_PDF)
    (docs / ".hidden.png").write_bytes(b"x")
    (docs / "readme.txt").write_text("not an input suffix")
    return docs


# -- expansion --------------------------------------------------------------------------------


def test_folders_are_searched_recursively_sorted_without_hidden_or_other_suffixes(corpus):
    found = expand_inputs([str(corpus)])
    names = [Path(s).relative_to(corpus).as_posix() for s in found.sources]
    assert names == ["broken.pdf", "corrupt.png", "demo_image1.jpg", "demo_image3.jpg", "demo_pdf1.pdf",
                     "notes.png", "sub/demo_image2.png"]
    assert found.problems == []
    assert all(Path(s).is_absolute() for s in found.sources)


def test_globs_files_duplicates_and_missing_inputs(corpus, tmp_path):
    found = expand_inputs([str(corpus / "*.jpg"), str(corpus / "demo_image1.jpg"), str(corpus / "readme.txt"),
                           str(tmp_path / "nope.pdf"), str(corpus / "*.tif")])
    assert [Path(s).name for s in found.sources] == ["demo_image1.jpg", "demo_image3.jpg", "readme.txt"]
    assert len(found.problems) == 2
    assert "nope.pdf: no such file or folder" in found.problems[0]
    assert "matches no file" in found.problems[1]


def test_uris_go_through_fsspec():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/batchjob-test/a.png", (SAMPLES / "demo_image2.png").read_bytes())
    fs.pipe("/batchjob-test/deeper/b.pdf", (SAMPLES / "demo_pdf1.pdf").read_bytes())
    try:
        found = expand_inputs(["memory://batchjob-test/"])
        assert found.sources == ["memory:///batchjob-test/a.png", "memory:///batchjob-test/deeper/b.pdf"]
        scanned = scan_source(found.sources[1])
        assert (scanned["kind"], scanned["page_count"], scanned["error"]) == ("pdf", 2, None)
    finally:
        fs.rm("/batchjob-test", recursive=True)


def test_a_uri_without_its_filesystem_package_names_the_package():
    # s3fs is not a dependency of the project (nor installed by scripts/install.sh)
    found = expand_inputs(["s3://some-bucket/scans/"])
    assert found.sources == []
    assert len(found.problems) == 1 and "pip install s3fs" in found.problems[0]


# -- scanning, keys, plan ---------------------------------------------------------------------


def test_scan_recognises_content_not_names(corpus, tmp_path):
    rows = {Path(s).name: scan_source(s) for s in expand_inputs([str(corpus)]).sources}
    assert (rows["demo_pdf1.pdf"]["kind"], rows["demo_pdf1.pdf"]["page_count"]) == ("pdf", 2)
    assert (rows["demo_image1.jpg"]["kind"], rows["demo_image1.jpg"]["page_count"]) == ("image", 1)
    assert rows["corrupt.png"]["error"] is None  # a PNG header: the decoder reports it, per page
    assert "not an image or PDF" in rows["notes.png"]["error"]
    assert "PDF" in rows["broken.pdf"]["error"] and rows["broken.pdf"]["page_count"] is None
    missing = scan_source(str(tmp_path / "gone.png"))
    assert missing["error"].startswith("cannot read the file") and missing["sha256"] is None
    assert len(rows["demo_image1.jpg"]["sha256"]) == 64


def test_page_keys():
    key = page_key("ab" * 32, 3, "prompt_ocr")
    assert key == "ab" * 32 + ":3:prompt_ocr"
    assert page_key("ab" * 32, 3, "prompt_ocr") == key
    assert len({key, page_key("ab" * 32, 2, "prompt_ocr"), page_key("ab" * 32, 3, "prompt_layout_all_en"),
                page_key("cd" * 32, 3, "prompt_ocr")}) == 4
    assert page_key("ab" * 32, 1, "prompt_general", "What?") != page_key("ab" * 32, 1, "prompt_general", "Who?")
    assert page_key(None, 1, "prompt_ocr", source="/a") != page_key(None, 1, "prompt_ocr", source="/b")


def test_plan_expands_pdfs_skips_written_keys_and_keeps_unusable_files(corpus):
    scanned = [scan_source(s) for s in expand_inputs([str(corpus)]).sources]
    plan = plan_pages(scanned, "prompt_ocr", done=frozenset())
    assert len(plan.pages) == 6  # 2 PDF pages, 3 images, the corrupt PNG (fails when decoded)
    assert [p["page"] for p in plan.pages if p["kind"] == "pdf"] == [1, 2]
    assert sorted(Path(r["source"]).name for r in plan.failed) == ["broken.pdf", "notes.png"]
    done = {plan.pages[0]["key"], plan.pages[3]["key"], plan.failed[0]["key"]}
    again = plan_pages(scanned, "prompt_ocr", done=done)
    assert again.skipped == 3 and len(again.pages) == 4 and len(again.failed) == 1
    other_prompt = plan_pages(scanned, "prompt_layout_all_en", done=done)
    assert other_prompt.skipped == 0


# -- shards and resume ------------------------------------------------------------------------


def _row(key, error=None, **extra):
    return {"key": key, "source": "/x", "sha256": "s", "page": 1, "page_count": 1, "prompt_type": "prompt_ocr",
            "response": None if error else "text", "finish_reason": None if error else "eos", "prompt_tokens": 5,
            "new_tokens": 2, "seconds": 0.5, "error": error, **extra}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_shards_resume_and_superseded_rows(tmp_path, fmt):
    out = str(tmp_path / "out")
    first = ShardWriter(out, fmt, rows_per_shard=2)
    first.add([_row("a"), _row("b", error="cannot load the page: broken"), _row("c")])
    first.flush()
    assert (first.ok, first.failed, len(first.shards)) == (2, 1, 2)
    assert read_written(out) == {"a": True, "b": False, "c": True}
    older = shard_files(first.fs, first.root)
    assert len(older) == 2

    redo = ShardWriter(out, fmt)
    redo.add([_row("b"), _row("c")])
    redo.flush()
    assert drop_superseded(out, redo.keys, older) == 2
    assert read_written(out) == {"a": True, "b": True, "c": True}
    rows = [r for p in shard_files(redo.fs, redo.root) for r in _read(p)]
    assert sorted(r["key"] for r in rows) == ["a", "b", "c"]
    assert len(shard_files(redo.fs, redo.root)) == 2  # first run: [a] (rewritten), [c] (deleted); redo: [b, c]
    if fmt == "parquet":
        table = pq.read_table(out)  # the summary and temporary names are skipped by readers
        assert table.num_rows == 3 and table.schema.names == output_columns()


def _read(path):
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in Path(path).read_text().splitlines()]
    return pq.read_table(path).to_pylist()


# -- the actor's rows -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_runner(runner):
    """The session's tiny model behind a runner that generates 2 pages at once."""
    from model_runner.runner import ModelRunner

    return ModelRunner.from_model(runner.model, runner.processor, max_batch_size=2)


def _pages(corpus, names):
    scanned = [scan_source(str(corpus / n)) for n in names]
    return plan_pages(scanned, "prompt_layout_all_en", done=frozenset()).pages


def test_actor_runs_a_batch_concurrently_and_postprocesses(batch_runner, corpus):
    settings = JobSettings(dpi=36, max_new_tokens=4, batch_size=2, postprocess=True, logprobs=True, seed=1)
    actor = PageOcr(settings, runner=batch_runner)
    both_in = threading.Barrier(2, timeout=30)
    real_generate = batch_runner.generate

    def generate(*args, **kwargs):
        both_in.wait()  # breaks (error rows) unless the two pages are generated at the same time
        return real_generate(*args, **kwargs)

    batch_runner.generate = generate
    try:
        table = actor(pa.Table.from_pylist(_pages(corpus, ["demo_pdf1.pdf"])))
    finally:
        del batch_runner.generate
        actor.close()
    rows = table.to_pylist()
    assert table.schema.names == output_columns(postprocess=True, logprobs=True)
    assert [(r["page"], r["page_count"], r["error"]) for r in rows] == [(1, 2, None), (2, 2, None)]
    for row in rows:
        assert row["finish_reason"] in ("eos", "length") and 1 <= row["new_tokens"] <= 4
        assert row["prompt_tokens"] > 0 and row["seconds"] > 0
        assert isinstance(json.loads(row["layout"]), list) and isinstance(row["markdown"], str)
        assert len(row["logprobs"]) == len(row["tokens"]) == row["new_tokens"]
        assert 0 < row["min_token_prob"] <= row["mean_token_prob"] <= 1


def test_actor_turns_bad_pages_into_error_rows(batch_runner, corpus):
    actor = PageOcr(JobSettings(dpi=36, max_new_tokens=2, batch_size=2), runner=batch_runner)
    pages = _pages(corpus, ["corrupt.png", "demo_pdf1.pdf"])
    pages.append({**pages[1], "source": str(corpus / "vanished.pdf"), "key": "k-vanished"})

    def start(request, stats=None):
        raise RuntimeError("CUDA out of memory (simulated)")

    batch_runner.start = start
    try:
        rows = actor(pa.Table.from_pylist(pages)).to_pylist()
    finally:
        del batch_runner.start
        actor.close()
    # close() ends the page threads at once (the logged tracebacks keep the actor alive until a
    # garbage collection, and its idle threads with it)
    assert not [t for t in threading.enumerate() if t.name.startswith("dots-ocr-page") and t.is_alive()]
    errors = [r["error"] for r in rows]
    assert errors[0].startswith("cannot load the page: Could not decode image")
    assert errors[1] == errors[2] == "generation failed: RuntimeError: CUDA out of memory (simulated)"
    assert errors[3].startswith("cannot read the file")
    assert all(r["response"] is None and r["seconds"] is not None for r in rows)


def test_actor_loads_its_runner_with_the_batch_size(tiny_ckpt):
    import torch

    from dots_ocr_server.batch.actor import load_runner

    threads = torch.get_num_threads()
    try:
        runner = load_runner(JobSettings(model_path=str(tiny_ckpt), batch_size=3, max_new_tokens=64,
                                         cpus_per_actor=1))
        assert torch.get_num_threads() == 1  # an actor's torch keeps to its reserved CPUs
    finally:
        torch.set_num_threads(threads)
    assert runner.loaded and runner.max_batch_size == 3 and str(runner.device) == "cpu"
    assert runner.max_new_tokens_limit == 64


def test_pages_load_with_the_servers_loaders(corpus):
    from dots_ocr_server.pages import PageService, PageSource

    pages = PageService(None, page_policy())
    pdf = (corpus / "demo_pdf1.pdf").read_bytes()
    page = pages.load(PageSource(data=pdf, page=2, dpi=72)).image
    sharper = pages.load(PageSource(data=pdf, page=2, dpi=144)).image
    assert page.mode == "RGB" and abs(sharper.width - 2 * page.width) <= 1  # rendered at the dpi given
    image = pages.load(PageSource(data=(corpus / "demo_image1.jpg").read_bytes())).image
    assert image.mode == "RGB"


# -- the command line's early exits -----------------------------------------------------------


def test_no_inputs_and_no_model_exit_2_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--demo"]) == cli.EXIT_FATAL
    assert "no input files" in capsys.readouterr().err
    model = tmp_path / "no-model"
    assert cli.main([str(SAMPLES), "--out", str(tmp_path / "o"), "--model-path", str(model)]) == cli.EXIT_FATAL
    assert "No dots.ocr checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_ray_is_a_clear_exit_2(tmp_path, capsys, monkeypatch):
    from dots_ocr_server.batch import pipeline

    def no_ray():
        raise pipeline.RayMissing("dots-ocr-batch needs Ray Data; install it with: " + pipeline.INSTALL_HINT)

    monkeypatch.setattr(pipeline, "import_ray", no_ray)
    assert cli.main([str(SAMPLES), "--out", str(tmp_path / "o"), "--demo"]) == cli.EXIT_FATAL
    assert '.[batch]' in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--prompt-type", "prompt_general"], ["--question", "Why?"],
                                  ["--prompt", "Why?"], ["--prompt-type", "prompt_grounding_ocr"], ["--dpi", "20"],
                                  ["--model-path", "x", "--demo"], ["--force", "--retry-failed"]])
def test_bad_arguments_exit_2(tmp_path, argv):
    with pytest.raises(SystemExit) as stop:
        cli.main([str(SAMPLES), "--out", str(tmp_path / "o"), *argv])
    assert stop.value.code == 2


# -- the command line's whole run, with the Ray side replaced by an in-process one ------------


class InProcessEngine:
    """The RayEngine's methods, run in this process on the session's tiny model: the command
    line's planning, resume, shards and exit codes are tested here; Ray in test_batch_ray.py."""

    def __init__(self, runner):
        self.runner = runner
        self.ocr_calls = 0

    def start(self):
        pass

    def stop(self):
        pass

    def gpus(self):
        return 0

    def scan(self, sources):
        return [scan_source(s) for s in sources]

    def ocr(self, pages, settings, actors):
        actor = PageOcr(settings, runner=self.runner)
        try:
            for start in range(0, len(pages), settings.batch_size):
                self.ocr_calls += 1
                yield actor(pa.Table.from_pylist(pages[start:start + settings.batch_size])).to_pylist()
        finally:
            actor.close()


def _all_rows(out: Path):
    return [r for p in sorted(out.glob("part-*")) for r in _read(str(p))]


@pytest.mark.slow
def test_run_resume_retry_failed_and_force(batch_runner, corpus, tmp_path, capsys):
    engine = InProcessEngine(batch_runner)
    out = tmp_path / "out"
    inputs = [str(corpus / n) for n in ("demo_pdf1.pdf", "sub/demo_image2.png", "corrupt.png", "notes.png")]
    fast = ["--out", str(out), "--demo", "--dpi", "36", "--max-new-tokens", "3", "--batch-size", "2"]

    assert cli.main([*inputs, *fast], engine=engine) == cli.EXIT_FAILED
    first = {r["key"]: r for r in _all_rows(out)}
    assert sorted((Path(r["source"]).name, r["page"], r["error"] is None) for r in first.values()) == [
        ("corrupt.png", 1, False), ("demo_image2.png", 1, True), ("demo_pdf1.pdf", 1, True),
        ("demo_pdf1.pdf", 2, True), ("notes.png", 1, False)]
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["pages_ok"], summary["pages_failed"], summary["pages_skipped"]) == (3, 2, 0)
    assert "pages ok: 3, failed: 2, skipped: 0" in capsys.readouterr().out

    calls = engine.ocr_calls
    assert cli.main([*inputs, *fast], engine=engine) == cli.EXIT_OK  # nothing left to do
    assert engine.ocr_calls == calls and {r["key"] for r in _all_rows(out)} == set(first)
    assert "pages ok: 0, failed: 0, skipped: 5" in capsys.readouterr().out

    assert cli.main([*inputs, *fast, "--retry-failed"], engine=engine) == cli.EXIT_FAILED
    rows = _all_rows(out)
    assert len(rows) == 5 and {r["key"] for r in rows} == set(first)  # failed rows replaced, not added
    assert "pages ok: 0, failed: 2, skipped: 3" in capsys.readouterr().out

    assert cli.main([inputs[1], *fast, "--force", "--format", "jsonl"], engine=engine) == cli.EXIT_OK
    rows = _all_rows(out)
    assert len(rows) == 5 and {r["key"] for r in rows} == set(first)
    jsonl = [json.loads(line) for p in out.glob("part-*.jsonl") for line in p.read_text().splitlines()]
    assert [Path(r["source"]).name for r in jsonl] == ["demo_image2.png"]


def test_run_with_logprobs_and_another_prompt_type_writes_new_keys(batch_runner, corpus, tmp_path):
    engine = InProcessEngine(batch_runner)
    out = tmp_path / "out"
    image = str(corpus / "sub" / "demo_image2.png")
    common = ["--out", str(out), "--demo", "--max-new-tokens", "3"]
    assert cli.main([image, *common, "--logprobs"], engine=engine) == cli.EXIT_OK
    assert cli.main([image, *common, "--prompt-type", "prompt_ocr"], engine=engine) == cli.EXIT_OK
    rows = sorted(_all_rows(out), key=lambda r: r["prompt_type"])
    assert [r["prompt_type"] for r in rows] == ["prompt_layout_all_en", "prompt_ocr"]
    assert len(rows[0]["logprobs"]) == rows[0]["new_tokens"]
    assert "logprobs" not in rows[1]  # shards differ in columns; each one is self-describing


# -- one document per input beside the page rows ---------------------------------------------------


def test_complete_inputs_get_the_same_document_as_the_client(tmp_path):
    from dots_ocr_server.batch.documents import document_name, write_documents

    data = Path(__file__).parent / "data"
    pdf = Path(__file__).resolve().parents[1] / "samples" / "demo_pdf1.pdf"
    pages = json.loads((data / "demo_pdf1.pages.json").read_text(encoding="utf-8"))["pages"]
    sha = hashlib.sha256(pdf.read_bytes()).hexdigest()
    settings = JobSettings(postprocess=True, dpi=200)
    out = tmp_path / "out"
    writer = ShardWriter(str(out), "parquet", postprocess=True)
    # the rows the actors write for the two pages (the layouts of the hand-written test data), and
    # a second input with only one of its two pages done: no document for it yet
    writer.add([{"key": f"{sha}:{p['page']}", "source": str(pdf), "sha256": sha, "page": p["page"], "page_count": 2,
                 "prompt_type": "prompt_layout_all_en", "response": json.dumps(p["layout"]), "finish_reason": "eos",
                 "layout": json.dumps(p["layout"], ensure_ascii=False), "repaired": False, "width": p["width"],
                 "height": p["height"], "error": None} for p in pages])
    writer.add([{"key": "other:1", "source": "/x/half.pdf", "sha256": "f" * 64, "page": 1, "page_count": 2,
                 "prompt_type": "prompt_layout_all_en", "layout": "[]", "width": 10, "height": 10, "error": None}])
    writer.flush()
    folders = write_documents(str(out), settings)
    folder = out / "_documents" / document_name(str(pdf), sha)
    assert folders == [str(folder)]
    golden = (data / "demo_pdf1.document.md").read_text(encoding="utf-8")
    assert (folder / "document.md").read_text(encoding="utf-8") == golden
    document = json.loads((folder / "document.json").read_text(encoding="utf-8"))
    assert [(p["page"], p["width"], p["height"]) for p in document["pages"]] == [(1, 2339, 3308), (2, 2339, 3308)]
    assert document["metadata"]["prompt_type"] == "prompt_layout_all_en" and document["metadata"]["dpi"] == 200
    assert write_documents(str(out), JobSettings(postprocess=False)) == []  # no layouts: no documents
