"""Shared fixtures: the tiny random checkpoint (built once per test session), a loaded runner,
and the Flask app / client built on them."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random dots.ocr checkpoint in the official on-disk layout (sharded safetensors)."""
    from model_runner.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "DotsOCR", seed=0)


@pytest.fixture(scope="session")
def tiny_mocr_ckpt(tmp_path_factory):
    """The same tiny checkpoint in the dots.mocr layout (config/preprocessor fields of dots.ocr 1.5)."""
    from model_runner.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mocr") / "DotsMOCR", seed=0, family="dots.mocr")


@pytest.fixture(scope="session", params=["dots.ocr", "dots.mocr"])
def tiny_family_ckpt(request):
    """The tiny checkpoint in each released layout in turn (tests using it run once per family)."""
    return request.getfixturevalue("tiny_ckpt" if request.param == "dots.ocr" else "tiny_mocr_ckpt")


@pytest.fixture(scope="session")
def runner(tiny_ckpt):
    """A ModelRunner on the tiny checkpoint, loaded once (CPU, float32)."""
    from model_runner.runner import ModelRunner

    return ModelRunner(tiny_ckpt, device="cpu", dtype="float32").load()


@pytest.fixture()
def rendered_prompt(runner, monkeypatch):
    """What the runner's processor renders: after a request, ``["prompt"]`` (the user text) and
    ``["system"]`` (the system turn, or None) of the last prompt it built."""
    seen = {}
    original = runner.processor.render_prompt

    def spy(prompt, n_images=1, system=None):
        seen["prompt"], seen["system"] = prompt, system
        return original(prompt, n_images, system=system)

    monkeypatch.setattr(runner.processor, "render_prompt", spy)
    return seen


@pytest.fixture()
def app(runner, tmp_path):
    from server import create_app

    # jobs keep their database under the test's own folder (a job submitted here stays there)
    return create_app({"image_root": None, "data_dir": str(tmp_path / "job-data")}, runner=runner)


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def page_image():
    """A small synthetic 'page' (RGB) with some dark text-like bars."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (220, 300), "white")
    draw = ImageDraw.Draw(image)
    for row in range(8):
        draw.rectangle([20, 20 + row * 32, 200 - (row % 3) * 30, 34 + row * 32], fill=(20, 20, 20))
    return image
