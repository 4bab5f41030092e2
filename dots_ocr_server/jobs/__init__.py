"""Documents as durable jobs: submit a PDF (or an image), watch it progress page by page, fetch
the whole document; nothing is lost when the server is killed.

- ``store``    the SQLite database (WAL) of jobs and pages: every change one transaction
- ``schemas``  what ``POST /jobs`` takes, and the ``pages`` selection (``"1-3,7"``)
- ``manager``  ``JobManager``: submission (the document checked and stored), the workers that run
               the pages through the page service in the generation slots, retries, cancel,
               events, retention, storage cap, recovery after a crash
- ``pages``    one page of a job: its page request, the answer kept, its figures
- ``views``    what the routes answer: summaries, events, the document (JSON / Markdown / ZIP)

The HTTP routes are ``dots_ocr_server/api/jobs.py``.
"""
from .manager import JOB_ROUTE, JobManager, StorageFull
from .schemas import JobRequest, parse_pages, validate_job_request
from .store import JobStore

__all__ = ["JOB_ROUTE", "JobManager", "StorageFull", "JobRequest", "parse_pages", "validate_job_request", "JobStore"]
