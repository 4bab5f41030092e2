"""GET /metrics (Prometheus text, parsed with prometheus_client's parser), request ids, the
access line and JSON logs. In-process on the tiny checkpoint."""
import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dots_ocr_server.api.config import parse_args
from dots_ocr_server.api.request_log import JsonFormatter, RequestIdFilter, configure_logging
from forcing import FailsAtStep
from server import create_app


@pytest.fixture()
def page_path(page_image, tmp_path):
    path = tmp_path / "page.png"
    page_image.save(path)
    return str(path)


def _scrape(client) -> dict:
    """{(sample name, sorted labels): value} of one scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _ocr(client, **body):
    body = {"prompt_type": "prompt_ocr", "temperature": 0, "max_new_tokens": 6, **body}
    return client.post("/ocr", json=body)


def test_counters_and_histograms_move_with_requests(client, page_path):
    before = _scrape(client)
    answers = [_ocr(client, image=page_path).get_json(),
               json.loads(_ocr(client, image=page_path, stream=True).get_data(as_text=True).splitlines()[-1])]
    after = _scrape(client)

    def moved(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("dots_ocr:http_requests_total", route="/ocr", method="POST", status="200") == 2
    assert moved("dots_ocr:http_requests_total", route="/metrics", method="GET", status="200") == 1
    reasons = [a["done_reason"] for a in answers]
    for reason in set(reasons):
        assert moved("dots_ocr:request_success_total", finished_reason=reason,
                     prompt_type="prompt_ocr", route="/ocr") == reasons.count(reason)
    assert moved("dots_ocr:generation_tokens_total", route="/ocr") == sum(a["eval_count"] for a in answers)
    assert moved("dots_ocr:prompt_tokens_total", route="/ocr") == sum(a["prompt_eval_count"] for a in answers)
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_image_load_time_seconds",
                 "request_vision_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_queue_time_seconds", "time_per_output_token_seconds"):
        assert moved(f"dots_ocr:{name}_count", route="/ocr") == 2, name
        assert moved(f"dots_ocr:{name}_bucket", le="+Inf", route="/ocr") == 2, name
    # The e2e histogram is observed when a generation ends, so its sum covers each answer's load,
    # prompt and decode time and stays within its total_duration, which also counts the
    # post-processing after the end (ns -> s; the slack is the clock readings' rounding to ns).
    e2e_s = moved("dots_ocr:e2e_request_latency_seconds_sum", route="/ocr")
    parts_s = sum(a["load_duration"] + a["prompt_eval_duration"] + a["eval_duration"] for a in answers) / 1e9
    total_s = sum(a["total_duration"] for a in answers) / 1e9
    assert parts_s - 1e-6 <= e2e_s <= total_s + 1e-6
    assert _value(after, "dots_ocr:model_loaded") == 1
    assert _value(after, "dots_ocr:model_load_time_seconds") > 0
    assert ("dots_ocr:gpu_memory_used_bytes", ()) not in after  # CPU: no GPU gauges


def test_busy_errors_and_gauges(app, client, page_path, runner):
    state = app.extensions["dots_ocr"]
    before = _scrape(client)
    assert state.lock.acquire()
    try:
        assert _value(_scrape(client), "dots_ocr:num_requests_running") == 1
        assert _ocr(client, image=page_path).status_code == 429
    finally:
        state.lock.release()
    assert _ocr(client, image="/nonexistent.png").status_code == 400
    assert client.get("/nope").status_code == 404
    with FailsAtStep(runner.model, 2, "boom"):
        assert _ocr(client, image=page_path).status_code == 500
    after = _scrape(client)
    assert _value(after, "dots_ocr:num_requests_running") == 0
    assert _value(after, "dots_ocr:num_requests_waiting") == 0
    rejected = "dots_ocr:request_busy_rejections_total"
    assert _value(after, rejected) - _value(before, rejected) == 1
    for status, route, method in (("429", "/ocr", "POST"), ("400", "/ocr", "POST"), ("404", "unmatched", "GET"),
                                  ("500", "/ocr", "POST")):
        assert _value(after, "dots_ocr:http_requests_total", route=route, method=method, status=status) == \
            _value(before, "dots_ocr:http_requests_total", route=route, method=method, status=status) + 1
    assert _value(after, "dots_ocr:request_generation_errors_total", prompt_type="prompt_ocr", route="/ocr") == \
        _value(before, "dots_ocr:request_generation_errors_total", prompt_type="prompt_ocr", route="/ocr") + 1


def test_a_stream_closed_early_counts_as_cancelled(client, page_path):
    before = _scrape(client)
    response = _ocr(client, image=page_path, stream=True, max_new_tokens=400, prompt_type="prompt_layout_all_en")
    next(iter(response.response))
    response.close()
    after = _scrape(client)
    assert _value(after, "dots_ocr:request_success_total", finished_reason="cancelled",
                  prompt_type="prompt_layout_all_en", route="/ocr") - _value(
        before, "dots_ocr:request_success_total", finished_reason="cancelled", prompt_type="prompt_layout_all_en",
        route="/ocr") == 1


def test_each_app_has_its_own_registry_metrics_is_open_and_can_be_off(runner, page_path):
    guarded = create_app({"api_key": "secret"}, runner=runner).test_client()
    other = create_app({}, runner=runner).test_client()
    assert _ocr(guarded, image=page_path).status_code == 401
    assert _value(_scrape(guarded), "dots_ocr:http_requests_total", route="/ocr", method="POST", status="401") == 1
    assert _value(_scrape(other), "dots_ocr:http_requests_total", route="/ocr", method="POST", status="401") == 0
    off = create_app({"metrics": False}, runner=runner).test_client()
    assert off.get("/metrics").status_code == 404
    assert _ocr(off, image=page_path).status_code == 200
    config = parse_args(["--no-metrics", "--log-format", "json"])
    assert config.metrics is False and config.log_format == "json"
    assert parse_args([]).metrics is True


# -- request ids and logs -----------------------------------------------------------------------


def test_request_id_echoed_generated_and_in_error_bodies(client, page_path):
    given = client.get("/health", headers={"X-Request-Id": "job-42.page_3"})
    assert given.headers["X-Request-Id"] == "job-42.page_3"
    made = client.get("/health").headers["X-Request-Id"]
    assert len(made) == 32 and int(made, 16) >= 0
    assert client.get("/health", headers={"X-Request-Id": "bad id <x>"}).headers["X-Request-Id"] != "bad id <x>"
    error = client.post(
        "/ocr", json={"image": "/nonexistent.png"}, headers={"X-Request-Id": "abc"})
    assert error.status_code == 400 and error.get_json()["request_id"] == "abc"
    assert list(error.get_json()) == ["error", "request_id"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture()
def server_records():
    handler = _Records()
    logger = logging.getLogger("dots_ocr_server")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_log_lines_and_the_access_line_carry_the_request_id(client, page_path, runner, server_records):
    with FailsAtStep(runner.model, 3, "boom mid-stream"):
        response = client.post("/ocr", json={"image": page_path, "prompt_type": "prompt_ocr", "temperature": 0,
                                             "max_new_tokens": 20, "stream": True},
                               headers={"X-Request-Id": "req-1"})
        lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
        response.close()
    assert lines[-1]["error"].startswith("Generation failed") and lines[-1]["request_id"] == "req-1"
    ours = [r for r in server_records if r.request_id == "req-1"]
    assert any(r.levelname == "ERROR" and "mid-stream" in r.getMessage() for r in ours)
    access = [r for r in ours if r.name == "dots_ocr_server.access"]
    assert len(access) == 1
    fields = access[0].access
    assert fields["status"] == 200 and fields["path"] == "/ocr" and fields["duration_ms"] > 0
    assert "eval_count" in fields and "prompt_eval_count" in fields and fields["done_reason"] == "error"

    server_records.clear()
    response = _ocr(client, image=page_path, max_new_tokens=5)
    body = response.get_json()
    response.close()  # a WSGI server closes every response; the access line is written then
    access = [r for r in server_records if r.name == "dots_ocr_server.access"]
    assert len(access) == 1
    assert access[0].access["eval_count"] == body["eval_count"]
    assert access[0].access["done_reason"] == body["done_reason"]
    assert "done_reason=" in access[0].getMessage()


def test_json_log_format():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        handler = configure_logging("json")
        assert isinstance(handler.formatter, JsonFormatter)
        record = logging.LogRecord("dots_ocr_server.access", logging.INFO, __file__, 1, "%s", ("GET /health",), None)
        record.access = {"status": 200, "duration_ms": 1.5}
        handler.filter(record)
        entry = json.loads(handler.format(record))
        assert entry["message"] == "GET /health" and entry["status"] == 200 and entry["request_id"] == "-"
        assert entry["level"] == "INFO" and entry["logger"] == "dots_ocr_server.access"
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_the_decoding_loop_logs_a_request_failure_under_its_request_id(client, page_path, runner):
    """A failure the shared decoding thread logs for one request carries that request's id."""
    from dots_ocr_server.api.request_log import RequestIdFilter

    handler = _Records()
    handler.addFilter(RequestIdFilter())  # as the server's root handler has (configure_logging)
    logger = logging.getLogger("model_runner.batching")
    logger.addHandler(handler)
    try:
        with FailsAtStep(runner.model, 1, "boom in the prefill"):
            response = client.post("/ocr", json={"image": page_path, "prompt_type": "prompt_ocr", "temperature": 0,
                                                 "max_new_tokens": 4}, headers={"X-Request-Id": "req-prefill"})
        assert response.status_code == 500 and response.get_json()["request_id"] == "req-prefill"
    finally:
        logger.removeHandler(handler)
    failed = [r for r in handler.records if "failed in its prefill" in r.getMessage()]
    assert failed and all(r.request_id == "req-prefill" for r in failed)


def test_client_supplied_methods_and_paths_cannot_grow_the_scrape(runner):
    client = create_app({}, runner=runner).test_client()
    client.get("/health")
    baseline = client.get("/metrics").get_data()
    for index in range(300):  # made-up methods, and paths no route has
        client.open(f"/made-up/{index}", method=f"M{index}X")
        client.open("/health", method=f"Q{index}")
    for _ in range(20):
        client.open("/ocr", method="A" * 30_000)
    scrape = client.get("/metrics").get_data()
    samples = _scrape(client)
    methods = {dict(labels).get("method") for (name, labels) in samples if name == "dots_ocr:http_requests_total"}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert _value(samples, "dots_ocr:http_requests_total", route="unmatched", method="other", status="404") == 300
    assert len(scrape) < len(baseline) + 2000  # a handful of new series, not thousands
    assert max(len(line) for line in scrape.splitlines()) < 300
