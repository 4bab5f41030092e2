"""dots-ocr-eval compare: two demo servers on the same checkpoint agree on every page (also
through /v1, and against a folder of answers saved from one of them); two on different seeds of
the tiny checkpoint do not, and the report says where; layout cells are matched by IoU."""
import json

import pytest
from eval_support import SAMPLES, demo_server

from dots_ocr_server.eval import cli, compare
from dots_ocr_server.eval.drivers import Answer

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker

PAGES = [str(SAMPLES / "demo_image2.png"), str(SAMPLES / "demo_pdf1.pdf")]  # 3 pages
COMMON = ["--dpi", "50", "--max-new-tokens", "16", "--no-progress"]


@pytest.fixture(scope="module")
def other_seed_ckpt(tmp_path_factory):
    from model_runner.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_seed1") / "DotsOCR", seed=1)


@pytest.fixture(scope="module")
def servers(tiny_ckpt, other_seed_ckpt, tmp_path_factory):
    logs = tmp_path_factory.mktemp("compare")
    with demo_server(tiny_ckpt, logs) as first, demo_server(tiny_ckpt, logs) as twin, \
            demo_server(other_seed_ckpt, logs) as other:
        yield first.url, twin.url, other.url


def _compare(tmp_path, capsys, *args):
    out = tmp_path / "compare.json"
    code = cli.main(["compare", *PAGES, *COMMON, "--json-out", str(out), *args])
    return code, json.loads(out.read_text()), capsys.readouterr().out


def test_same_checkpoint_agrees_on_every_page(servers, tmp_path, capsys):
    first, twin, _ = servers
    saved = tmp_path / "saved"
    code, report, printed = _compare(tmp_path, capsys, "--a", first, "--b", twin, "--expect-identical",
                                     "--save-b", str(saved), "--concurrency", "2")
    assert code == 0
    assert [row["page"].rsplit("/", 1)[-1] for row in report["pages"]] == [
        "demo_image2.png", "demo_pdf1.pdf p1", "demo_pdf1.pdf p2"]
    for row in report["pages"]:
        assert row["identical"] and row["edit_distance"] == 0 and row["first_divergence"] is None
        assert row["tokens"][0] == row["tokens"][1] > 0
    assert report["totals"]["identical"] == report["totals"]["compared"] == 3
    assert report["a"]["url"] == first and report["b"]["health"]["device"] == "cpu"
    assert report["settings"]["temperature"] == 0  # greedy by default
    assert "identical: 3 of 3" in printed
    # one server against the answers saved from the other: the same agreement, tokens included
    assert (saved / "demo_pdf1" / "page_0002" / "logprobs.json").exists()
    code, report, _ = _compare(tmp_path, capsys, "--a", first, "--b-answers", str(saved), "--expect-identical")
    assert code == 0 and report["totals"]["identical"] == 3
    assert report["b"] == {"answers": str(saved)}


def test_same_checkpoint_through_v1_agrees_with_ocr(servers, tmp_path, capsys):
    first, twin, _ = servers
    code, report, _ = _compare(tmp_path, capsys, "--a", first, "--b", twin, "--b-api", "openai",
                               "--prompt-type", "prompt_ocr")
    assert code == 0
    assert report["b"]["api"] == "openai" and report["b"]["model"] == "dots-ocr"
    assert report["totals"]["identical"] == 3, report["pages"]


def test_other_seed_differs_and_the_report_says_where(servers, tmp_path, capsys):
    first, _, other = servers
    code, report, printed = _compare(tmp_path, capsys, "--a", first, "--b", other, "--expect-identical")
    assert code == 1  # --expect-identical: the answers differ
    for row in report["pages"]:
        assert not row["identical"] and row["edit_distance"] > 0
        where = row["first_divergence"]
        assert where["token"] >= 0 and where["char"] >= 0
        assert where["a_token"] != where["b_token"]
    assert report["totals"]["identical"] == 0 and report["totals"]["earliest_divergence_token"] is not None
    assert "identical: 0 of 3" in printed and "token " in printed


def test_a_dots_ocr_client_output_folder_is_a_side(servers, tmp_path, capsys):
    from dots_ocr_server.client.cli import main as client_main

    first, twin, _ = servers
    out = tmp_path / "client_out"
    assert client_main([*PAGES, "--server", twin, "--out", str(out), "--temperature", "0", "--logprobs",
                        "--max-new-tokens", "16", "--dpi", "50", "--no-progress"]) == 0
    code, report, _ = _compare(tmp_path, capsys, "--a", first, "--b-answers", str(out), "--expect-identical")
    assert code == 0 and report["totals"]["identical"] == 3


def test_a_missing_saved_answer_fails_that_page(servers, tmp_path, capsys):
    first, _, _ = servers
    empty = tmp_path / "empty"
    empty.mkdir()
    code, report, _ = _compare(tmp_path, capsys, "--a", first, "--b-answers", str(empty))
    assert code == 1
    assert report["totals"]["failed"] == 3 and "no saved answer" in report["pages"][0]["error"]


def _layout(*cells):
    return json.dumps([{"bbox": box, "category": category, "text": "t"} for box, category in cells])


def test_layout_cells_are_matched_by_iou_with_category_agreement():
    a = _layout(([0, 0, 100, 100], "Title"), ([0, 200, 100, 300], "Text"), ([500, 500, 600, 600], "Picture"))
    b = _layout(([0, 0, 100, 80], "Title"), ([0, 200, 100, 300], "Table"), ([900, 900, 950, 950], "Text"))
    result = compare.compare_layouts(a, b, threshold=0.5)
    assert result["cells"] == [3, 3] and result["matched"] == 2
    assert sorted(result["ious"]) == [0.8, 1.0]
    assert result["mean_iou"] == pytest.approx(0.9)
    assert result["same_category"] == 1 and result["category_agreement"] == 0.5
    # one to one: two B boxes over one A box match it once, the better first
    pairs = compare.match_cells([{"bbox": [0, 0, 10, 10]}], [{"bbox": [0, 0, 10, 9]}, {"bbox": [0, 0, 10, 10]}], 0.5)
    assert pairs == [(0, 1, 1.0)]


def test_first_divergence_by_token_id_and_by_text():
    a = Answer(text="hello world", tokens=[(1, "hello"), (2, " world")])
    b = Answer(text="hello there", tokens=[(1, "hello"), (3, " there")])
    where = compare.first_divergence(a, b)
    assert where["token"] == 1 and (where["a_token"], where["b_token"]) == (" world", " there")
    assert where["char"] == 6
    assert compare.first_divergence(a, Answer(text="hello world", tokens=[(None, "hello"), (None, " world")])) is None
    assert compare.first_divergence(a, Answer(text="hello world")) is None
