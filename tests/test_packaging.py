"""The project's packaging: environment.yml and pyproject.toml agree, the entry points resolve,
and CI runs the README's test command."""
import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    return {Requirement(line).name: Requirement(line) for line in pip if not line.startswith("-")}


def test_environment_yml_agrees_with_pyproject():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"] + extras["server"] + extras["test"]]
    conda = _conda_pip_requirements()
    assert set(conda) == {r.name for r in wanted}
    for requirement in wanted:
        pinned = conda[requirement.name]
        if str(pinned.specifier).startswith("=="):  # torch/torchvision pinned: the pin must satisfy the range
            assert Version(str(pinned.specifier)[2:]) in requirement.specifier, requirement
        else:
            assert pinned.specifier == requirement.specifier, requirement


def test_install_script_pins_match_environment_yml():
    install = (ROOT / "scripts/install.sh").read_text()
    conda = _conda_pip_requirements()
    assert f"DOTS_OCR_TORCH_VERSION:-{str(conda['torch'].specifier)[2:]}" in install
    assert f"DOTS_OCR_TORCHVISION_VERSION:-{str(conda['torchvision'].specifier)[2:]}" in install


def test_console_scripts_resolve():
    for target in _pyproject()["project"]["scripts"].values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    command = re.search(r"^bash scripts/test\.sh$", readme, re.M)
    assert command, "README must show the test command"
    assert "bash scripts/test.sh" in ci


def test_prompts_json_ships_with_the_package():
    assert "*.json" in _pyproject()["tool"]["setuptools"]["package-data"]["model_runner"]
    assert (ROOT / "model_runner/prompts.json").is_file()


@pytest.mark.slow
def test_the_client_installs_and_runs_without_torch(tmp_path, tiny_ckpt):
    """``pip install .[client]`` into a fresh virtualenv: no torch, no generic top-level module
    names, and the client's commands run, against a real server too."""
    from serverproc import running_server

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "-c", str(ROOT / "constraints.txt"), f"{ROOT}[client]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    top_level = {entry.name.removesuffix(".py") for entry in site.iterdir()
                 if not entry.name.endswith((".dist-info", ".pth")) and not entry.name.startswith(("_", "."))}
    assert not {"api", "layout", "batch_job", "ocr_client", "jobs", "pages"} & top_level, top_level
    assert {"dots_ocr_server", "model_runner", "image_utils", "server"} <= top_level
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    for command in ("dots-ocr-client", "dots-ocr-assemble"):
        shown = subprocess.run([str(bin_dir / command), "--help"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "usage:" in shown.stdout, shown.stderr
    out = tmp_path / "out"
    with running_server(tiny_ckpt, log_dir=tmp_path) as url:
        run = subprocess.run([str(bin_dir / "dots-ocr-client"), str(ROOT / "samples" / "demo_image3.jpg"),
                              "--server", url, "--out", str(out), "--prompt-type", "prompt_ocr",
                              "--max-new-tokens", "4", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    answer = json.loads((out / "demo_image3" / "page_0001" / "response.json").read_text())
    assert answer["prompt_type"] == "prompt_ocr" and answer["eval_count"] <= 4
