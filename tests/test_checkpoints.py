"""Checkpoint families (dots.ocr and dots.mocr layouts of the tiny model) and the download script's
argument handling (no network)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from model_runner.tiny import MOCR_PREPROCESSOR_AUTO_MAP, build_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mocr_layout_differs_only_in_the_two_published_fields(tiny_ckpt, tiny_mocr_ckpt):
    ocr_files = sorted(p.name for p in tiny_ckpt.iterdir())
    assert sorted(p.name for p in tiny_mocr_ckpt.iterdir()) == ocr_files
    different = [n for n in ocr_files if (tiny_ckpt / n).read_bytes() != (tiny_mocr_ckpt / n).read_bytes()]
    assert different == ["config.json", "preprocessor_config.json"]

    ocr_cfg = json.loads((tiny_ckpt / "config.json").read_text())
    mocr_cfg = json.loads((tiny_mocr_ckpt / "config.json").read_text())
    assert ocr_cfg["vision_config"].pop("attn_implementation") == "flash_attention_2"
    assert mocr_cfg["vision_config"].pop("attn_implementation") == "sdpa"
    assert mocr_cfg == ocr_cfg

    ocr_pre = json.loads((tiny_ckpt / "preprocessor_config.json").read_text())
    mocr_pre = json.loads((tiny_mocr_ckpt / "preprocessor_config.json").read_text())
    assert list(mocr_pre)[0] == "auto_map" and mocr_pre.pop("auto_map") == MOCR_PREPROCESSOR_AUTO_MAP
    assert mocr_pre == ocr_pre


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="family must be one of"):
        build_tiny_checkpoint(tmp_path / "x", family="dots.vlm")


def test_mocr_folder_loads_and_generates_like_dots_ocr(runner, tiny_mocr_ckpt, page_image):
    """A dots.mocr folder loads through the same loader, ignoring its extra fields, into the same
    model: same config values the model uses, same processor, same greedy answer."""
    from model_runner.runner import ModelRunner

    mocr = ModelRunner(tiny_mocr_ckpt, device="cpu", dtype="float32").load()
    assert mocr.processor.image_processor.to_dict() | {"auto_map": None} == \
        runner.processor.image_processor.to_dict() | {"auto_map": None}
    a = mocr.generate(page_image, "prompt_ocr", temperature=0.0, max_new_tokens=8)
    b = runner.generate(page_image, "prompt_ocr", temperature=0.0, max_new_tokens=8)
    assert a.stats.new_tokens == 8 and a.text == b.text
    assert a.stats.model_size == b.stats.model_size
    for (name, p), (_, q) in zip(mocr.model.state_dict().items(), runner.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_make_tiny_model_script_writes_the_mocr_layout(tmp_path, capsys):
    script = _script("make_tiny_model")
    assert script.main([str(tmp_path / "DotsMOCR"), "--family", "dots.mocr", "--shards", "1"]) == 0
    assert "tiny dots.mocr checkpoint" in capsys.readouterr().out
    pre = json.loads((tmp_path / "DotsMOCR" / "preprocessor_config.json").read_text())
    assert pre["auto_map"] == MOCR_PREPROCESSOR_AUTO_MAP
    assert (tmp_path / "DotsMOCR" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "x"), "--family", "qwen"])


@pytest.mark.parametrize("repo_id, folder", [
    ("rednote-hilab/dots.ocr", "DotsOCR"),
    ("rednote-hilab/dots.mocr", "DotsMOCR"),
    ("rednote-hilab/dots.mocr-svg", "DotsMOCR-SVG"),
    ("someone/dots.mocr.finetune-v2", "dotsmocrfinetune-v2"),
])
def test_download_target_folder_has_no_dots(repo_id, folder):
    path = _script("download_weights").default_out_dir(repo_id)
    assert path == Path("weights") / folder and "." not in path.name


class _FakeHub:
    def __init__(self):
        self.calls = []

    def snapshot_download(self, **kwargs):
        self.calls.append(kwargs)
        return kwargs["local_dir"]


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    hub = _FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def test_download_defaults_to_dots_ocr(fake_hub, capsys):
    script = _script("download_weights")
    assert script.main([]) == 0
    (call,) = fake_hub.calls
    assert call["repo_id"] == "rednote-hilab/dots.ocr" and Path(call["local_dir"]) == Path("weights/DotsOCR")
    assert call["revision"] is None and "*.safetensors" in call["allow_patterns"]
    assert not any(p.endswith(".py") for p in call["allow_patterns"])
    assert "--model-path weights/DotsOCR" in capsys.readouterr().out


def test_download_takes_the_repo_id_and_folder(fake_hub, tmp_path):
    script = _script("download_weights")
    script.main(["--repo-id", "rednote-hilab/dots.mocr-svg", "--revision", "abc123"])
    script.main([str(tmp_path / "mine"), "--repo-id", "rednote-hilab/dots.mocr"])
    assert [(c["repo_id"], Path(c["local_dir"]), c["revision"]) for c in fake_hub.calls] == [
        ("rednote-hilab/dots.mocr-svg", Path("weights/DotsMOCR-SVG"), "abc123"),
        ("rednote-hilab/dots.mocr", tmp_path / "mine", None),
    ]


@pytest.mark.parametrize("bad", ["dots.mocr", "a/b/c", "../x", "owner/..", "", "owner/na me", "https://x.y/a"])
def test_download_refuses_malformed_repo_ids(fake_hub, bad, capsys):
    with pytest.raises(SystemExit) as info:
        _script("download_weights").main(["--repo-id", bad])
    assert info.value.code == 2 and "not a Hub repo id" in capsys.readouterr().err
    assert fake_hub.calls == []
