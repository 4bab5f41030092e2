"""dots-ocr-eval throughput against a real demo server (CPU, tiny checkpoint): its counts agree
with what the server's /metrics counted, through /ocr and through the server's own /v1; failed
pages are counted by status; and the report's page and settings code works offline."""
import json

import pytest
from eval_support import SAMPLES, demo_server, scrape, scrape_labelled

from dots_ocr_server.eval import cli, throughput

pytestmark = pytest.mark.slow  # the tier of pyproject.toml's "slow" marker

PAGES = [str(SAMPLES / "demo_image2.png"), str(SAMPLES / "demo_pdf1.pdf")]
COMMON = ["--dpi", "50", "--max-new-tokens", "12", "--no-progress"]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    with demo_server(tiny_ckpt, tmp_path_factory.mktemp("throughput"), "--max-batch-size", "2",
                     "--max-new-tokens-limit", "64") as running:
        yield running


def _run(tmp_path, capsys, *args):
    out = tmp_path / "throughput.json"
    code = cli.main(["throughput", *PAGES, *COMMON, "--json-out", str(out), *args])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert json.loads(printed.strip().splitlines()[-1]) == result  # the table, then the same JSON line
    return code, result, printed


def test_ocr_counts_match_the_servers_metrics(server, tmp_path, capsys):
    before = scrape(server.url)
    code, result, printed = _run(tmp_path, capsys, "--target", f"ocr={server.url}", "--pages", "6",
                                 "--concurrency", "2", "--warmup", "0", "--fixed-length", "off")
    after = scrape(server.url)
    assert code == 0
    (row,) = result["targets"]
    assert row["pages"] == row["requests"] == 6 and row["errors"] == {} and row["concurrency"] == 2
    moved = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    assert moved["dots_ocr:request_success_total"] == 6
    assert moved["dots_ocr:generation_tokens_total"] == row["output_tokens"]["total"] > 0
    assert moved["dots_ocr:prompt_tokens_total"] == row["prompt_tokens_total"] > 0
    counted = row["server_counted"]
    assert counted["generation_tokens"] == row["output_tokens"]["total"]
    assert counted["request_success"] == 6 and counted["responses"] == {"200": 6}
    assert 1 <= row["output_tokens"]["min"] <= row["output_tokens"]["max"] <= 12
    assert row["ttft_p50_s"] <= row["latency_p50_s"] and row["pages_per_s"] > 0
    assert row["health"]["device"] == "cpu" and row["fixed_length"] == "off"
    assert result["pages"]["count"] == 3 and result["settings"]["max_new_tokens"] == 12
    assert "ocr " + server.url in printed and "pages/s" in printed


def test_openai_against_the_servers_own_v1(server, tmp_path, capsys):
    route = "/v1/chat/completions"
    ok_before = scrape_labelled(server.url, "dots_ocr:http_requests_total", route=route, status="200")
    refused_before = scrape_labelled(server.url, "dots_ocr:http_requests_total", route=route, status="400")
    code, result, _ = _run(tmp_path, capsys, "--target", f"openai={server.url}", "--pages", "5", "--concurrency", "2",
                           "--warmup", "1", "--no-stream")
    assert code == 0
    (row,) = result["targets"]
    assert row["api"] == "openai" and row["model"] == "dots-ocr" and row["pages"] == 5
    # auto fixed length: the warm-up asked for ignore_eos, which this server takes (as vLLM does)
    assert row["fixed_length"] == "ignore_eos"
    assert scrape_labelled(server.url, "dots_ocr:http_requests_total", route=route, status="400") == refused_before
    assert scrape_labelled(server.url, "dots_ocr:http_requests_total", route=route, status="200") - ok_before == 5 + 1
    assert row["server_counted"]["responses"] == {"200": 5}
    assert row["output_tokens"]["reported_by"] == 5
    assert row["output_tokens"]["min"] == row["output_tokens"]["max"] == 12  # fixed length
    # /v1's generations reach /metrics like /ocr's: the counts agree
    assert row["server_counted"]["generation_tokens"] == row["output_tokens"]["total"] == 5 * 12
    assert row["ttft_p50_s"] is None  # plain /v1 answers carry no time to first token


def test_both_apis_in_one_run_and_by_duration(server, tmp_path, capsys):
    code, result, printed = _run(tmp_path, capsys, "--target", f"ocr={server.url}", "--target", f"openai={server.url}",
                                 "--duration", "1", "--concurrency", "1", "--warmup", "0", "--fixed-length", "off")
    assert code == 0
    ocr, openai = result["targets"]
    assert (ocr["api"], openai["api"]) == ("ocr", "openai")
    for row in (ocr, openai):
        assert row["pages"] == row["requests"] >= 1 and row["errors"] == {}
        assert row["server_counted"]["responses"] == {"200": row["pages"]}
    assert ocr["server_counted"]["generation_tokens"] == ocr["output_tokens"]["total"]
    assert printed.count(server.url) >= 2


def test_failed_pages_are_counted_by_status(server, tmp_path, capsys):
    # 100 tokens is over this server's --max-new-tokens-limit (64): /ocr answers 400
    code, result, _ = _run(tmp_path, capsys, "--server", server.url, "--pages", "3", "--warmup", "0",
                           "--fixed-length", "off", "--max-new-tokens", "100")
    assert code == 1
    (row,) = result["targets"]
    assert row["pages"] == 0 and row["errors"] == {"400": 3}
    assert "max-new-tokens-limit" in row["first_error"]
    assert row["server_counted"]["responses"] == {"400": 3}


def test_fixed_length_on_gives_every_page_its_max_new_tokens(server, tmp_path, capsys):
    code, result, _ = _run(tmp_path, capsys, "--server", server.url, "--pages", "3", "--fixed-length", "on",
                           "--warmup", "1")
    assert code == 0
    (row,) = result["targets"]
    assert row["fixed_length"] == "ignore_eos" and row["output_tokens"]["min"] == row["output_tokens"]["max"] == 12


def test_fixed_length_on_fails_against_a_server_that_refuses_ignore_eos(tmp_path, capsys):
    """A server that answers the ignore_eos field with a 400 (as one without it does): --fixed-length
    on stops with a message naming the field, and auto falls back to answers of any length."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _json(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._json(200, {"status": "healthy", "model_loaded": True} if self.path == "/health" else {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("ignore_eos"):
                self._json(400, {"error": "Unknown field 'ignore_eos'"})
            else:
                self._json(200, {"model": "dots-ocr", "response": "text", "prompt_type": body["prompt_type"],
                                 "eval_count": 3, "done_reason": "stop"})

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        code = cli.main(["throughput", *PAGES, *COMMON, "--server", url, "--pages", "1", "--fixed-length", "on",
                         "--no-stream"])
        assert code == 2 and "ignore_eos" in capsys.readouterr().err
        code, result, _ = _run(tmp_path, capsys, "--server", url, "--pages", "2", "--warmup", "1", "--no-stream")
        assert code == 0 and result["targets"][0]["fixed_length"].startswith("not supported")
    finally:
        httpd.shutdown()


def test_drive_keeps_the_concurrency_and_the_count():
    import threading
    import time

    from serverproc import page_png

    from dots_ocr_server.eval.drivers import Answer
    from dots_ocr_server.eval.pages import page_from_bytes

    lock, in_flight, most = threading.Lock(), [0], [0]

    def send(_page):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return Answer(text="x", output_tokens=3)

    page = page_from_bytes(page_png(), "page.png")
    samples, wall = throughput.drive(send, [page], 3, count=10)
    assert len(samples) == 10 and most[0] == 3 and wall > 0
    summary = throughput.summarize(samples, wall, max_new_tokens=3)
    assert summary["output_tokens"] == {"total": 30, "min": 3, "max": 3, "reported_by": 10,
                                        "all_at_max_new_tokens": True}
    assert page.image().mime == "image/png" and page.image().size == (224, 308)
