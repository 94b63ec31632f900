"""Every command in the README runs: its python blocks, and its ``fx-adapters`` command lines on tiny models
(``test_cli``'s workspace holds ``my-llama`` and ``my-road-adapter``); its set-up commands are CI's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
from test_cli import cli, workspace

ROOT = Path(__file__).parents[1]
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SETUP, *SHELL = [code for lang, code in BLOCKS if lang == "bash"]
CLI = "fx-adapters"
UPGRADE_PIP = ["pip", "install", "--upgrade", "pip"]  # CI only


def commands(script: str) -> list[list[str]]:
    """The commands of a shell script: one per line or per ``&&``, comments dropped."""
    return [shlex.split(part) for line in script.splitlines() for part in line.split("#")[0].split("&&")
            if part.strip()]


CLI_COMMANDS = [tuple(argv[1:]) for argv in commands(SETUP + "".join(SHELL)) if argv[0] == CLI]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = workspace(tmp_path_factory)
    for argv in CLI_COMMANDS:
        cli(root, *argv)
    return root


def test_every_code_block_is_run():
    assert {lang for lang, _ in BLOCKS} == {"bash", "python"}
    assert all(argv[0] == CLI for argv in commands("".join(SHELL)))


def test_setup_installs_and_tests_as_ci_does():
    def normalized(argv):  # CI says `python -m pip install --quiet ...` where the README says `pip install ...`
        return [word for word in argv[2:] if word != "--quiet"] if argv[:3] == ["python", "-m", "pip"] else argv

    ci = [normalized(argv) for argv in commands((ROOT / ".ci" / "run").read_text()) if argv[0] == "python"]
    assert [argv for argv in commands(SETUP) if argv[0] != CLI] == [argv for argv in ci if argv != UPGRADE_PIP]


def test_the_cli_is_the_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {CLI: "fx_adapters.__main__:main"}  # the tests run it as `python -m fx_adapters`


@pytest.mark.parametrize("argv", CLI_COMMANDS, ids=" ".join)
def test_cli_command_succeeds(ws, argv):
    result = cli(ws, *argv).result()
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(tmp_path, monkeypatch, index):
    monkeypatch.chdir(tmp_path)  # blocks write files (adapters, .pt2) to the current directory
    exec(compile(PYTHON[index], f"README.md python block {index + 1}", "exec"), {})
