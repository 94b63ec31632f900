"""In CI a test skipped because bitsandbytes, PEFT, hypothesis or the console script is missing fails the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SKIPPED = '''
import pytest

bnb = pytest.importorskip("bitsandbytes_that_is_not_installed")


def test_needs_it():
    pass
'''


DELIBERATE = '''
import pytest


def test_a_case_peft_cannot_run():
    pytest.skip("PEFT's adapter_names path raises on OPT (covered per sample above)")
'''


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """This suite's conftest and a module skipped for want of a bitsandbytes package."""
    root = tmp_path_factory.mktemp("ci-skips")
    shutil.copy(Path(__file__).with_name("conftest.py"), root / "conftest.py")
    (root / "test_quantized.py").write_text(SKIPPED)
    (root / "test_plain.py").write_text("def test_runs():\n    pass\n")
    (root / "test_deliberate.py").write_text(DELIBERATE)
    return root


def run(root: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "FXA_NO_SKIPS")} | env
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(root)],
                          cwd=root, env=environ, capture_output=True, text=True)


def test_a_dependency_skip_fails_the_run_in_ci_and_is_listed(suite):
    done = run(suite, CI="true")
    assert done.returncode == 1, done.stdout
    assert "tests skipped in CI" in done.stdout and "test_quantized.py" in done.stdout
    assert "1 passed, 2 skipped" in done.stdout  # the other test ran: only the skip fails the run


def test_a_deliberate_skip_naming_peft_does_not_fail_the_run_in_ci(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_deliberate.py").write_text(DELIBERATE)
    done = run(tmp_path, CI="true")
    assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout
