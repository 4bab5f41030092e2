"""The project's packaging: environment.yml and pyproject.toml agree, the entry points resolve,
and CI runs the README's test command."""
import importlib
import re
import tomllib
from pathlib import Path

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
