"""The mutation check's mutants (``scripts/mutation_check.py``, minutes to run, not in this suite) stay applicable:
each one's text occurs exactly once in its file, so a change to the code cannot quietly retire a mutant."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name].MUTANTS


@pytest.mark.parametrize("mutant", _mutants(), ids=lambda m: m.name)
def test_each_mutants_text_occurs_once_in_its_file(mutant):
    assert (ROOT / mutant.file).read_text().count(mutant.old) == 1, \
        f"mutant {mutant.name!r} is stale: update its text in scripts/mutation_check.py"
