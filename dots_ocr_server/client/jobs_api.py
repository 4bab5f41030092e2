"""HTTP: the client of the server's document jobs (``/jobs``), over :class:`.http_client.OCRClient`
(its sessions, API key, timeouts and 429 retries).

- :meth:`JobsAPI.check`     the server serves jobs and takes the API key (else FatalError)
- :meth:`JobsAPI.by_hash`   the jobs of one document (``GET /jobs?sha256=``), newest first
- :meth:`JobsAPI.submit`    a multipart upload (``POST /jobs``): the job's first summary
- :meth:`JobsAPI.follow`    the progress events (``GET /jobs/<id>/events``) until the job ends;
                            a stream that breaks or stays quiet past ``--timeout`` (a proxy's
                            limit, a long page) is reopened after a look at the job's status
- :meth:`JobsAPI.result_zip` the finished job's ``document.md``, ``document.json``, ``figures/``

Errors: 401 and a server without ``/jobs`` stop the run (FatalError); everything else about one
job (a refused document, a job gone from the server) is a PageError for that input.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Optional

from .errors import FatalError, PageError
from .http_client import OCRClient, error_message

__all__ = ["FINISHED", "JobsAPI", "finished"]

FINISHED = ("done", "failed", "cancelled")
LIST_LIMIT = 200  # the server's largest page of GET /jobs


def finished(detail: dict[str, Any]) -> bool:
    """The job's result is ready: it ended and none of its pages still runs (the server's rule)."""
    return detail.get("status") in FINISHED and not any(p.get("status") == "running"
                                                         for p in detail.get("pages") or ())


class JobsAPI:
    """The ``/jobs`` routes of ``client``'s server; ``wait_s``: the pause before reopening events."""

    def __init__(self, client: OCRClient, wait_s: float = 1.0):
        self.client = client
        self.wait_s = wait_s

    def _json(self, response, what: str, job_id: Optional[str] = None) -> Any:
        """The body of a 2xx ``response``; the errors of the module docstring otherwise."""
        try:
            status = response.status_code
            if status == 401:
                raise self.client.key_refused(error_message(response))
            if status == 404 and job_id is None:
                raise FatalError(f"the server at {self.client.server} does not serve document jobs (an older server, "
                                 "or started with --no-jobs); run without --jobs")
            if status == 404:
                raise PageError(f"job {job_id} is gone from the server (deleted, or expired after its --job-retention)",
                                status=404)
            if not 200 <= status < 300:
                raise PageError(f"{what}: HTTP {status}: {error_message(response)}", status=status)
            try:
                return response.json()
            except ValueError:
                raise PageError(f"{what}: the server answered with a body that is not JSON") from None
        finally:
            response.close()

    def check(self) -> None:
        """``GET /jobs?limit=1``: FatalError unless the server serves jobs and takes the API key."""
        self.client.ensure_ready()
        self._json(self.client.get("/jobs", params={"limit": 1}), "listing the jobs")

    def by_hash(self, sha256: str) -> Iterator[dict[str, Any]]:
        """The summaries of the jobs of the document with this SHA-256, newest first (every page
        of the listing, fetched as they are read)."""
        path, params = "/jobs", {"sha256": sha256, "limit": LIST_LIMIT}
        while path:
            body = self._json(self.client.get(path, params=params), "listing the jobs")
            yield from body.get("jobs") or ()
            path, params = body.get("next"), None

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/<id>``: the summary and every page's status."""
        return self._json(self.client.get(f"/jobs/{job_id}"), f"job {job_id}", job_id)

    def submit(self, filename: str, data: bytes, fields: dict[str, Any]) -> dict[str, Any]:
        """``POST /jobs`` as a multipart upload of ``data`` with the form ``fields``: the 202's body
        (``job_id``, ``status``, ``pages_total``). A refused document is a PageError with the
        server's message."""
        form = {name: str(value) for name, value in fields.items()}
        try:
            response = self.client.post("/jobs", form, files={"file": (filename, data, "application/octet-stream")})
        except PageError as exc:
            if exc.status is None:  # no answer (timeout): not a refusal
                raise
            raise PageError(f"the server refused the document ({exc})", status=exc.status) from None
        body = self._json(response, "submitting the document")
        if not isinstance(body, dict) or not isinstance(body.get("job_id"), str):
            raise PageError("the server's answer to POST /jobs has no job_id")
        return body

    def follow(self, job_id: str, on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Call ``on_progress`` with every event of the job (``pages_done``, ``pages_failed``,
        ``pages_total``) until it ends; returns its last summary. See the module docstring for
        streams that break."""
        while True:
            end = self._read_events(job_id, on_progress)
            if end is not None:
                return end
            detail = self.job(job_id)
            on_progress(detail)
            if finished(detail):
                return detail
            self.client.sleep(self.wait_s)

    def _read_events(self, job_id: str, on_progress: Callable[[dict[str, Any]], None]) -> Optional[dict[str, Any]]:
        """One events stream: the end event, or None when the stream broke or ended early."""
        import requests

        try:
            response = self.client.get(f"/jobs/{job_id}/events", stream=True)
        except PageError:  # no first event within --timeout (a long page): look at the status, then again
            return None
        if response.status_code != 200:
            self._json(response, f"the events of job {job_id}", job_id)  # raises for an error
            return None
        try:
            for raw in response.iter_lines():
                if not raw:
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    raise PageError(f"the events of job {job_id}: a line that is not JSON") from None
                if not isinstance(event, dict):
                    continue
                on_progress(event)
                if event.get("event") == "end":
                    return event
        except requests.exceptions.RequestException:  # broken, or quiet for longer than --timeout
            return None
        finally:
            response.close()
        return None

    def result_zip(self, job_id: str, keep_headers: bool = False, chunks: bool = False) -> bytes:
        """``GET /jobs/<id>/result?format=zip``: the bytes of the finished job's ZIP (with
        ``chunks``: its ``chunks.jsonl`` too)."""
        params = {"format": "zip", **({"keep_headers": "true"} if keep_headers else {}),
                  **({"chunks": "true"} if chunks else {})}
        response = self.client.get(f"/jobs/{job_id}/result", params=params)
        if response.status_code != 200:
            self._json(response, f"the result of job {job_id}", job_id)  # raises for an error
            raise PageError(f"the result of job {job_id}: HTTP {response.status_code} instead of the ZIP")
        try:
            return response.content
        finally:
            response.close()
