"""Graph passes, one stage a file: capture → match → rewrite (→ fold).

Each pass takes a ``torch.fx.GraphModule`` and returns ``PassResult(graph_module, modified)``;
``run_passes`` runs them with ``torch.fx``'s PassManager, which recompiles after each pass, lints the graph
and names the pass that failed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager


def _lint(graph_module: torch.nn.Module) -> None:
    graph_module.graph.lint()


def run_passes(graph_module: torch.fx.GraphModule, passes: Sequence) -> PassResult:
    """Run ``passes`` in order on ``graph_module`` (in place), linting before and after each."""
    manager = PassManager(list(passes), run_checks_after_each_pass=True)
    manager.add_checks(_lint)
    return manager(graph_module)
