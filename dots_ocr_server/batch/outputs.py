"""Outputs of a batch job: one row per page in Parquet or JSONL shards under ``--out``.

Layout of ``--out`` (a local folder, or any URI fsspec can write to):

- ``part-<run id>-<nnnnn>.parquet`` (or ``.jsonl``): the rows, written by the driver as results
  arrive, each shard written under a hidden temporary name and then renamed, so a shard is either
  complete or absent. ``pyarrow.parquet.read_table(OUT)`` / ``pandas.read_parquet(OUT)`` read them
  all (they skip names starting with ``.`` or ``_``).
- ``_summary.json``: the last run's summary.

Resume: :func:`read_written` reads the ``key`` and ``error`` columns of every shard; the planner
skips those keys. A page redone later (``--force``, ``--retry-failed``) gets a new row, and
:func:`drop_superseded` then removes its older rows from the older shards, so the folder keeps
one row per page.
"""
from __future__ import annotations

import io
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from .inputs import open_filesystem

__all__ = [
    "FORMATS", "SUMMARY_NAME", "output_schema", "output_columns", "new_run_id", "ShardWriter",
    "shard_files", "read_written", "drop_superseded", "Summary", "token_confidence",
]

FORMATS = ("parquet", "jsonl")
SUMMARY_NAME = "_summary.json"
_SHARD_PREFIX = "part-"


def _base_fields():
    import pyarrow as pa

    return [
        ("key", pa.string()),            # resume key: <sha256>:<page>:<prompt type>
        ("source", pa.string()),         # absolute path or URI of the file
        ("sha256", pa.string()),         # of the file's bytes (null when it could not be read)
        ("page", pa.int32()),            # 1-based
        ("page_count", pa.int32()),      # pages of the file (1 for an image; null when unknown)
        ("prompt_type", pa.string()),
        ("response", pa.string()),       # the model's answer (null on error)
        ("finish_reason", pa.string()),  # eos / length / repetition (null on error)
        ("prompt_tokens", pa.int64()),
        ("new_tokens", pa.int64()),
        ("seconds", pa.float64()),       # loading + generation of this page
        ("error", pa.string()),          # null when the page is ok
    ]


def _postprocess_fields():
    import pyarrow as pa

    return [
        ("layout", pa.string()),      # JSON: the cells (spots for scene spotting), original pixels
        ("markdown", pa.string()),    # the Markdown (the SVG document for prompt_image_to_svg)
        ("repaired", pa.bool_()),     # the answer needed repair (see layout.postprocess_response)
        ("width", pa.int32()),        # the page image the layout is in (pixels): a PDF page at --dpi
        ("height", pa.int32()),
    ]


def _logprob_fields():
    import pyarrow as pa

    return [
        ("tokens", pa.list_(pa.string())),     # the generated tokens' texts
        ("logprobs", pa.list_(pa.float64())),  # their log-probabilities (raw model distribution)
        ("min_token_prob", pa.float64()),
        ("mean_token_prob", pa.float64()),
    ]


def output_schema(postprocess: bool = False, logprobs: bool = False):
    """The pyarrow schema of the rows: the base columns, plus the post-processing and the
    log-probability columns when asked for."""
    import pyarrow as pa

    fields = _base_fields()
    if postprocess:
        fields += _postprocess_fields()
    if logprobs:
        fields += _logprob_fields()
    return pa.schema(fields)


def output_columns(postprocess: bool = False, logprobs: bool = False) -> list[str]:
    return output_schema(postprocess, logprobs).names


def new_run_id() -> str:
    """Sorts by start time; the random part keeps two runs started in the same second apart."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _encode(rows: list[dict[str, Any]], fmt: str, schema) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def _write_atomic(fs, path: str, data: bytes) -> None:
    """Write under a hidden temporary name, then rename: readers never see half a shard."""
    directory, _, name = path.rpartition("/")
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


class ShardWriter:
    """Collects rows and writes them as shards of up to ``rows_per_shard`` rows, or sooner when
    ``flush_seconds`` have passed since the last shard (so a slow run loses little if stopped).
    Counts ok and failed rows and remembers the keys written."""

    def __init__(self, out: str, fmt: str, *, postprocess: bool = False, logprobs: bool = False,
                 run_id: str | None = None, rows_per_shard: int = 256, flush_seconds: float = 60.0):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        self.fs, self.root = open_filesystem(out)
        self.root = self.root.rstrip("/") or "/"
        self.fs.makedirs(self.root, exist_ok=True)
        self.fmt = fmt
        self.schema = output_schema(postprocess, logprobs)
        self.columns = self.schema.names
        self.run_id = run_id or new_run_id()
        self.rows_per_shard = rows_per_shard
        self.flush_seconds = flush_seconds
        self.keys: set[str] = set()
        self.ok = self.failed = 0
        self.shards: list[str] = []
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            row = {name: row.get(name) for name in self.columns}
            self._buffer.append(row)
            self.keys.add(row["key"])
            if row["error"] is None:
                self.ok += 1
            else:
                self.failed += 1
        if len(self._buffer) >= self.rows_per_shard or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        while self._buffer:
            rows, self._buffer = self._buffer[:self.rows_per_shard], self._buffer[self.rows_per_shard:]
            path = f"{self.root}/{_SHARD_PREFIX}{self.run_id}-{len(self.shards):05d}.{self.fmt}"
            _write_atomic(self.fs, path, _encode(rows, self.fmt, self.schema))
            self.shards.append(path)


# ---------------------------------------------------------------------------------------------
# Reading back (resume) and replacing superseded rows
# ---------------------------------------------------------------------------------------------


def shard_files(fs, root: str) -> list[str]:
    """The row shards under ``root`` (both formats), sorted (oldest run first)."""
    if not fs.isdir(root):
        return []
    found = [p for fmt in FORMATS for p in fs.glob(f"{root.rstrip('/')}/{_SHARD_PREFIX}*.{fmt}")]
    return sorted(found, key=lambda p: p.rpartition("/")[2])


def _read_rows(fs, path: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
    if path.endswith(".jsonl"):
        with fs.open(path, "rb") as handle:
            rows = [json.loads(line) for line in handle.read().decode("utf-8").splitlines() if line.strip()]
        return [{c: r.get(c) for c in columns} for r in rows] if columns else rows
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns).to_pylist()


def read_written(out: str) -> dict[str, bool]:
    """Key -> ok (no error) of every row already under ``out``; a key with an ok row and an
    error row counts as ok."""
    fs, root = open_filesystem(out)
    written: dict[str, bool] = {}
    for path in shard_files(fs, root):
        for row in _read_rows(fs, path, ["key", "error"]):
            written[row["key"]] = written.get(row["key"], False) or row["error"] is None
    return written


def drop_superseded(out: str, keys: set[str], older: Iterable[str]) -> int:
    """Remove the rows whose key is in ``keys`` from the shards ``older`` (written before this
    run); a shard left empty is deleted. Returns the number of rows removed."""
    fs, _root = open_filesystem(out)
    removed = 0
    for path in older:
        rows = _read_rows(fs, path)
        kept = [row for row in rows if row.get("key") not in keys]
        if len(kept) == len(rows):
            continue
        removed += len(rows) - len(kept)
        if not kept:
            fs.rm(path)
            continue
        if path.endswith(".jsonl"):
            data = _encode(kept, "jsonl", None)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as handle:
                schema = pq.read_schema(handle)
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(kept, schema=schema), buffer)
            data = buffer.getvalue()
        _write_atomic(fs, path, data)
    return removed


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    pages_ok: int
    pages_failed: int
    pages_skipped: int
    seconds: float          # from the start of the OCR stage to the last row written
    total_seconds: float    # the whole job, Ray start-up and model loading included
    out: str
    shards: int
    actors: int
    device: str

    @property
    def pages_per_second(self) -> float:
        done = self.pages_ok + self.pages_failed
        return done / self.seconds if self.seconds > 0 and done else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pages_per_second"] = round(self.pages_per_second, 4)
        data["seconds"] = round(self.seconds, 3)
        data["total_seconds"] = round(self.total_seconds, 3)
        return data

    def text(self) -> str:
        rate = self.pages_per_second
        return (f"pages ok: {self.pages_ok}, failed: {self.pages_failed}, skipped: {self.pages_skipped}; "
                f"{rate:.3g} pages/s over {self.seconds:.1f} s of OCR ({self.total_seconds:.1f} s in all, "
                f"{self.actors} {self.device} actor{'s' if self.actors != 1 else ''}); "
                f"output: {self.out}")

    def write(self) -> None:
        fs, root = open_filesystem(self.out)
        data = json.dumps(self.as_dict(), indent=2).encode("utf-8") + b"\n"
        _write_atomic(fs, f"{root.rstrip('/')}/{SUMMARY_NAME}", data)


def token_confidence(logprobs: list[float]) -> tuple[float | None, float | None]:
    """(min, mean) token probability of an answer, from its tokens' log-probabilities."""
    if not logprobs:
        return None, None
    probs = [math.exp(lp) for lp in logprobs]
    return min(probs), sum(probs) / len(probs)
