"""The Ray side of a batch job: starting or joining Ray, the scan stage, the actor pool.

Two Ray Data executions per run:

1. **scan** (Ray tasks): one row per source file -> its content hash, kind and page count
   (:func:`batch_job.inputs.scan_source`). Small rows come back to the driver, which plans the
   pages (resume: skips written keys) without ever reading the corpus itself.
2. **ocr** (actor pool): one row per planned page -> ``map_batches(PageOcr, batch_size =
   --batch-size, compute = ActorPoolStrategy(size = --actors))``, one GPU per actor with
   ``--device cuda`` (``num_gpus=1``), ``--cpus-per-actor`` CPUs per actor with ``--device cpu``.
   The driver iterates the results (Ray Data's progress bars show while it does) and writes the
   shards itself, so ``--out`` means the same folder or bucket wherever the actors run.

Where Ray runs: with ``RAY_ADDRESS`` set (as ``ray job submit`` does), ``ray.init`` joins that
cluster; otherwise it starts a local Ray on this machine. A session that already initialised
Ray (a test, a notebook) is used as it is.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

from .actor import JobSettings, PageOcr
from .inputs import scan_source

__all__ = ["RayMissing", "RayEngine", "import_ray", "local_runtime_env", "start_ray", "scan_sources", "ocr_pages",
           "MAX_IN_FLIGHT_PER_ACTOR"]

#: Batches queued per actor: one running and one ready, so an actor never waits for its next
#: batch, while the tail of a run is not stuck behind a long queue on one actor.
MAX_IN_FLIGHT_PER_ACTOR = 2

#: Most blocks the page list is cut into (see ocr_pages).
MAX_BLOCKS = 10_000

INSTALL_HINT = 'pip install -e ".[batch]"   (or: pip install "ray[data]" pyarrow)'


class RayMissing(RuntimeError):
    """Ray (with Ray Data) is not installed."""


def import_ray():
    try:
        import ray
        import ray.data  # Ray Data is the part this job needs
    except ImportError as exc:
        raise RayMissing(f"dots-ocr-batch needs Ray Data ({exc}); install it with: {INSTALL_HINT}") from None
    return ray


def local_runtime_env() -> dict[str, Any]:
    """The runtime environment of a local Ray: this checkout first on the workers' PYTHONPATH, so
    that the workers import the same ``batch_job`` / ``model_runner`` as the driver even when
    the command runs from another folder."""
    root = str(Path(__file__).resolve().parents[1])
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def start_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster at ``RAY_ADDRESS``, or start a local Ray; nothing when Ray is already
    initialised. Returns True when this call started or joined it (the caller shuts it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # The job's code comes from the cluster (installed on its nodes, or shipped with
        # ``ray job submit --working-dir``); RAY_ADDRESS also tells ray.init where to go.
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=local_runtime_env())
    return True


def _scan_row(row: dict[str, Any]) -> dict[str, Any]:
    return scan_source(row["source"])


def scan_sources(sources: list[str]) -> list[dict[str, Any]]:
    """:func:`scan_source` of every file, as Ray tasks; in the order given."""
    ray = import_ray()
    if not sources:
        return []
    ds = ray.data.from_items([{"source": s} for s in sources])
    by_source = {row["source"]: row for row in ds.map(_scan_row).take_all()}
    return [by_source[s] for s in sources]


def _actor_resources(settings: JobSettings) -> dict[str, float]:
    if settings.device == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": settings.cpus_per_actor}


def ocr_pages(pages: list[dict[str, Any]], settings: JobSettings, actors: int) -> Iterator[Any]:
    """Run the planned ``pages`` through ``actors`` PageOcr actors; yields pyarrow tables of
    output rows as they are done."""
    ray = import_ray()
    if not pages:
        return
    # Blocks of about one batch each, so that every actor gets work from the start and the work
    # is shared out finely; capped so that a huge corpus does not become millions of tiny blocks.
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(pages) / settings.batch_size)))
    ds = ray.data.from_items(pages, override_num_blocks=blocks)
    strategy = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=MAX_IN_FLIGHT_PER_ACTOR)
    ds = ds.map_batches(PageOcr, fn_constructor_args=(settings,), batch_size=settings.batch_size,
                        batch_format="pyarrow", compute=strategy, **_actor_resources(settings))
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


class RayEngine:
    """What the command line asks of Ray, in one place (the command line takes any object with
    these methods; the tests give it one that runs in-process)."""

    def __init__(self) -> None:
        self._owns = False

    def start(self) -> None:
        """Join or start Ray (RayMissing when it is not installed)."""
        import_ray()
        self._owns = start_ray()

    def stop(self) -> None:
        if self._owns:
            import_ray().shutdown()
            self._owns = False

    def gpus(self) -> int:
        return int(import_ray().cluster_resources().get("GPU", 0))

    def scan(self, sources: list[str]) -> list[dict[str, Any]]:
        return scan_sources(sources)

    def ocr(self, pages: list[dict[str, Any]], settings: JobSettings, actors: int) -> Iterator[list[dict[str, Any]]]:
        for table in ocr_pages(pages, settings, actors):
            yield table.to_pylist()
