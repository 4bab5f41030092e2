"""The jobs' durable state: SQLite (the standard library's) in WAL mode, under ``--data-dir``.

Two tables. ``jobs``: one row per document (its status, times, the stored document's file, the
options it runs with); ``seq`` orders them by submission. ``pages``: one row per selected page
(its status, attempts, error, done_reason, and the answer as JSON once done). Every change is one
transaction, so a process killed at any moment (SIGKILL included) leaves a consistent database:

- a page is *claimed* (status ``running``, ``attempts`` + 1) in the transaction that picks it, so
  two workers never run the same page, and a page that was running when the process died is
  found ``running`` at the next start and put back in the queue (``recover``): it runs again, and
  its ``attempts`` shows it;
- a page's answer and its ``done`` status are written in one transaction: a page is either done
  with its answer or not done at all, so no page is lost or counted twice.

Connections are per thread (``sqlite3`` objects belong to the thread that made them); WAL lets
readers (status, events) read while a worker writes.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["JobStore", "JobRow", "PageRow", "JOB_STATUSES", "PAGE_STATUSES", "FINISHED"]

JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
PAGE_STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    page_count INTEGER NOT NULL,
    pages_total INTEGER NOT NULL,
    file TEXT,
    file_bytes INTEGER NOT NULL,
    options TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_sha256 ON jobs (sha256);
CREATE TABLE IF NOT EXISTS pages (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    page INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    done_reason TEXT,
    result TEXT,
    started_at REAL,
    finished_at REAL,
    PRIMARY KEY (job_id, page)
);
CREATE INDEX IF NOT EXISTS pages_status ON pages (status);
"""


@dataclass(frozen=True)
class JobRow:
    seq: int
    id: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    source: str
    sha256: str
    kind: str
    page_count: int
    pages_total: int
    file: str | None
    file_bytes: int
    options: dict[str, Any]
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class PageRow:
    job_id: str
    page: int
    status: str
    attempts: int
    error: str | None
    done_reason: str | None
    result: dict[str, Any] | None
    started_at: float | None
    finished_at: float | None


def _job(row: sqlite3.Row) -> JobRow:
    data = dict(row)
    data["options"] = json.loads(data["options"])
    return JobRow(**data)


def _page(row: sqlite3.Row) -> PageRow:
    data = dict(row)
    data["result"] = json.loads(data["result"]) if data["result"] else None
    return PageRow(**data)


class JobStore:
    """The database file ``path`` (created with its folder when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)  # its own transaction (executescript commits first)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level None: this module opens its transactions itself (BEGIN IMMEDIATE)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at each checkpoint, never corrupt
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection (other threads' close when their thread ends)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- jobs --------------------------------------------------------------------------------

    def create(self, job_id: str, *, source: str, sha256: str, kind: str, page_count: int, pages: list[int],
               file: str, file_bytes: int, options: dict[str, Any]) -> JobRow:
        """A queued job and its queued pages, in one transaction."""
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO jobs (id, status, created_at, source, sha256, kind, page_count, pages_total, file, "
                       "file_bytes, options) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, now, source, sha256, kind, page_count, len(pages), file, file_bytes,
                        json.dumps(options, ensure_ascii=False)))
            db.executemany("INSERT INTO pages (job_id, page, status) VALUES (?, ?, 'queued')",
                           [(job_id, page) for page in pages])
        return self.job(job_id)

    def job(self, job_id: str) -> JobRow | None:
        row = self._connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def pages(self, job_id: str) -> list[PageRow]:
        rows = self._connection().execute("SELECT * FROM pages WHERE job_id = ? ORDER BY page", (job_id,))
        return [_page(row) for row in rows]

    def page_counts(self, job_id: str) -> dict[str, int]:
        rows = self._connection().execute("SELECT status, COUNT(*) FROM pages WHERE job_id = ? GROUP BY status",
                                          (job_id,))
        return {status: count for status, count in rows}

    def list(self, *, limit: int, before: int | None = None, sha256: str | None = None) -> list[JobRow]:
        """Jobs newest first (``before``: only those submitted before the job of that ``seq``)."""
        where, args = [], []
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        if sha256 is not None:
            where.append("sha256 = ?")
            args.append(sha256)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
        return [_job(row) for row in self._connection().execute(sql, (*args, limit))]

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(jobs by status, pages by status) over the whole store."""
        db = self._connection()
        jobs = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        pages = dict(db.execute("SELECT status, COUNT(*) FROM pages GROUP BY status").fetchall())
        return jobs, pages

    def unfinished(self) -> bool:
        row = self._connection().execute("SELECT 1 FROM jobs WHERE status IN ('queued', 'running') LIMIT 1").fetchone()
        return row is not None

    # -- the work ----------------------------------------------------------------------------

    def recover(self) -> int:
        """After a restart: the pages that were running go back to the queue (their attempts kept);
        returns how many."""
        with self._transaction() as db:
            moved = db.execute("UPDATE pages SET status = 'queued' WHERE status = 'running'").rowcount
        return moved

    def claim(self) -> tuple[JobRow, PageRow] | None:
        """The next page to run (the oldest unfinished job's first queued page), marked running with
        one more attempt, its job running too; None when nothing is queued."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT p.job_id, p.page FROM pages p JOIN jobs j ON j.id = p.job_id "
                             "WHERE p.status = 'queued' AND j.status IN ('queued', 'running') "
                             "ORDER BY j.seq, p.page LIMIT 1").fetchone()
            if row is None:
                return None
            job_id, page = row
            db.execute("UPDATE pages SET status = 'running', attempts = attempts + 1, started_at = ? "
                       "WHERE job_id = ? AND page = ?", (now, job_id, page))
            db.execute("UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?) WHERE id = ?",
                       (now, job_id))
        return self.job(job_id), self.page(job_id, page)

    def page(self, job_id: str, page: int) -> PageRow | None:
        row = self._connection().execute("SELECT * FROM pages WHERE job_id = ? AND page = ?", (job_id, page)).fetchone()
        return _page(row) if row is not None else None

    def count_attempt(self, job_id: str, page: int) -> None:
        """One more attempt at a running page (its worker tries it again)."""
        with self._transaction() as db:
            db.execute("UPDATE pages SET attempts = attempts + 1 WHERE job_id = ? AND page = ? AND status = 'running'",
                       (job_id, page))

    def finish_page(self, job_id: str, page: int, status: str, *, result: dict[str, Any] | None = None,
                    error: str | None = None, done_reason: str | None = None) -> None:
        """A page's outcome (done / failed with its answer or error, cancelled, or ``queued``
        again to be run once more), in one transaction with the job's end when it was the last."""
        if status not in PAGE_STATUSES:
            raise ValueError(f"unknown page status {status!r}")
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE pages SET status = ?, result = ?, error = ?, done_reason = ?, "
                       "finished_at = CASE WHEN ? IN ('done', 'failed', 'cancelled') THEN ? ELSE NULL END "
                       "WHERE job_id = ? AND page = ? AND status = 'running'",
                       (status, json.dumps(result, ensure_ascii=False) if result is not None else None, error,
                        done_reason, status, now, job_id, page))
            self._end_if_finished(db, job_id, now)

    def _end_if_finished(self, db: sqlite3.Connection, job_id: str, now: float) -> None:
        left = db.execute("SELECT COUNT(*) FROM pages WHERE job_id = ? AND status IN ('queued', 'running')",
                          (job_id,)).fetchone()[0]
        if left == 0:
            db.execute("UPDATE jobs SET status = 'done', finished_at = ? "
                       "WHERE id = ? AND status IN ('queued', 'running')", (now, job_id))

    def fail_job(self, job_id: str, error: str) -> None:
        """A job that cannot run at all (its document is gone or unreadable): failed, its pages too."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE pages SET status = 'failed', error = ?, finished_at = ? "
                       "WHERE job_id = ? AND status IN ('queued', 'running')", (error, now, job_id))
            db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                       (error, now, job_id))

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job: its queued pages are cancelled at once (a running one when
        its worker stops it); False when the job had already finished."""
        now = time.time()
        with self._transaction() as db:
            changed = db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? "
                                 "WHERE id = ? AND status IN ('queued', 'running')", (now, job_id)).rowcount
            if changed:
                db.execute("UPDATE pages SET status = 'cancelled', finished_at = ? "
                           "WHERE job_id = ? AND status = 'queued'", (now, job_id))
        return bool(changed)

    def set_file(self, job_id: str, file: str | None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET file = ? WHERE id = ?", (file, job_id))

    def expired(self, finished_before: float) -> list[JobRow]:
        rows = self._connection().execute("SELECT * FROM jobs WHERE status IN ('done', 'failed', 'cancelled') "
                                          "AND finished_at < ? ORDER BY seq", (finished_before,))
        return [_job(row) for row in rows]

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM pages WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
