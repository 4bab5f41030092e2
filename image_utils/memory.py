"""Giving freed memory back to the operating system.

Each thread allocates from its own glibc malloc arena, and a multi-megabyte buffer freed there (a
decoded page, a rendered PDF bitmap, a busy period's activations) stays in the process's resident
memory. ``malloc_trim`` releases it. No library offers this; ctypes is the standard way to reach
the C allocator (a no-op where the C library has no ``malloc_trim``, e.g. musl or macOS).
"""
from __future__ import annotations

import ctypes
import functools

__all__ = ["give_back_freed_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def give_back_freed_memory() -> None:
    """Ask the C allocator to return freed memory of every arena to the system (about 1 ms)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
