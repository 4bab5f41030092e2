"""Shared fixtures: the tiny random checkpoint (built once per test session), a loaded runner,
and the Flask app / client built on them."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random dots.ocr checkpoint in the official on-disk layout (sharded safetensors)."""
    from model_runner.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "DotsOCR", seed=0)
