"""The server's generation slots: ``--max-batch-size N`` lets N /ocr requests generate
together, request N+1 gets 429 with Retry-After, /health reports ``max_batch_size`` and
``running``; at the default N = 1 the behaviour is the single processing lock of the dots.ocr API document.

Generation is held still by a forward hook on the model's lm_head that waits on an Event (on the
engine's loop thread): the requests in flight stay in flight for exactly as long as the test
needs, with no sleeps."""
from __future__ import annotations

import threading

import pytest

from model_runner.batching import WORKER_NAME
from model_runner.runner import ModelRunner
from server import BUSY_MESSAGE, create_app
from serverproc import wait_for


@pytest.fixture()
def page_path(page_image, tmp_path):
    path = tmp_path / "page.png"
    page_image.save(path)
    return path


@pytest.fixture(scope="module")
def runner2(runner):
    """The session's tiny model behind a runner of two generation slots."""
    return ModelRunner.from_model(runner.model, runner.processor, max_batch_size=2)


class Held:
    """While active, every lm_head forward (prefill and decode steps) waits until ``release()``."""

    def __init__(self, model):
        self.model = model
        self.gate = threading.Event()

    def __call__(self, module, inputs, output):
        self.gate.wait(30)

    def release(self):
        self.gate.set()

    def __enter__(self):
        self.handle = self.model.lm_head.register_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.handle.remove()


def _state(app):
    return app.extensions["dots_ocr"]


def _body(path, **extra):
    return {"image": str(path), "prompt_type": "prompt_ocr", "temperature": 0, "max_new_tokens": 6, **extra}


def _in_background(app, body, results):
    """POST /ocr on a thread of its own (its own test client); the response lands in ``results``."""
    def post():
        response = app.test_client().post("/ocr", json=body)
        results.append((response.status_code, response.get_json()))

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _generation_threads():
    return [t for t in threading.enumerate() if t.name == WORKER_NAME and t.is_alive()]


def test_n_plus_one_gets_429_with_retry_after(runner2, page_path):
    app = create_app({"image_root": None, "max_batch_size": 2}, runner=runner2)
    client = app.test_client()
    assert client.get("/health").get_json()["running"] == 0
    solo = client.post("/ocr", json=_body(page_path)).get_json()["response"]
    results = []
    with Held(runner2.model) as held:
        threads = [_in_background(app, _body(page_path), results) for _ in range(2)]
        wait_for(lambda: runner2.running == 2)  # both are inside the runner, held
        health = client.get("/health").get_json()
        assert health["max_batch_size"] == 2 and health["running"] == 2
        third = client.post("/ocr", json=_body(page_path))
        assert third.status_code == 429
        assert third.get_json()["error"] == BUSY_MESSAGE
        assert int(third.headers["Retry-After"]) >= 1
        held.release()
        for thread in threads:
            thread.join(60)
    assert [status for status, _ in results] == [200, 200]
    assert [body["response"] for _, body in results] == [solo, solo]  # batched: the same answer
    health = client.get("/health").get_json()
    assert health["running"] == 0 and runner2.running == 0
    assert not _state(app).lock.locked() and not _generation_threads()
    assert client.post("/ocr", json=_body(page_path)).status_code == 200  # the slots are free again


def test_default_one_slot_is_api_md_busy(runner, page_path):
    app = create_app({"image_root": None}, runner=runner)  # max_batch_size left at its default
    client = app.test_client()
    results = []
    with Held(runner.model) as held:
        thread = _in_background(app, _body(page_path), results)
        wait_for(lambda: runner.running == 1)
        health = client.get("/health").get_json()
        assert health["max_batch_size"] == 1 and health["running"] == 1
        second = client.post("/ocr", json=_body(page_path))
        assert second.status_code == 429
        assert second.get_json()["error"] == "Server is busy processing another request"
        held.release()
        thread.join(60)
    assert results[0][0] == 200
    assert client.get("/health").get_json()["running"] == 0
    assert not _state(app).lock.locked() and not _generation_threads()


@pytest.mark.slow
def test_closed_stream_leaves_the_batched_neighbour_intact(runner2, page_path):
    """One client reads a few streamed lines and goes away; the request generating beside it (a
    long answer, so that it is still running) gets exactly its solo answer, and both slots are
    free afterwards. (The exact-step versions of this are in test_batching.py.)"""
    app = create_app({"image_root": None, "max_batch_size": 2}, runner=runner2)
    client = app.test_client()
    body = _body(page_path, max_new_tokens=300)
    solo = client.post("/ocr", json=body).get_json()["response"]
    results = []
    neighbour = _in_background(app, body, results)
    wait_for(lambda: runner2.running == 1)
    streamed = client.post("/ocr", json=_body(page_path, max_new_tokens=2000, stream=True), buffered=False)
    lines = streamed.response
    first_lines = [next(lines), next(lines)]
    streamed.close()  # the client is gone: its generation is cancelled, its slot freed
    neighbour.join(60)
    assert all(line.startswith(b"{") for line in first_lines)
    assert results == [(200, results[0][1])] and results[0][1]["response"] == solo
    wait_for(lambda: runner2.running == 0)
    assert client.get("/health").get_json()["running"] == 0 and not _state(app).lock.locked()
    assert not _generation_threads()


def test_runner_with_fewer_slots_than_the_server_answers_429(runner, page_path):
    """A runner given to create_app may take fewer generations than the server's slots; its
    BatchFullError is the busy answer (429 + Retry-After), not a 500."""
    app = create_app({"image_root": None, "max_batch_size": 2}, runner=runner)  # the runner takes 1
    client = app.test_client()
    results = []
    with Held(runner.model) as held:
        thread = _in_background(app, _body(page_path), results)
        wait_for(lambda: runner.running == 1)
        second = client.post("/ocr", json=_body(page_path))
        assert second.status_code == 429 and second.get_json()["error"] == BUSY_MESSAGE
        assert second.headers["Retry-After"] == "1"
        assert client.get("/health").get_json()["running"] == 1  # the refused request gave its slot back
        held.release()
        thread.join(60)
    assert results[0][0] == 200
    assert client.get("/health").get_json()["running"] == 0 and runner.running == 0
