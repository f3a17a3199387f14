"""Running a graph and looking at some of its intermediate values on the way."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx


class ValueWatcher(torch.fx.Interpreter):
    """Runs the graph and hands the values of `targets` to `visit(node, value)` as they are made
    (nothing is kept: memory stays that of one forward)."""

    def __init__(self, gm: torch.fx.GraphModule, targets: set[torch.fx.Node],
                 visit: Callable[[torch.fx.Node, torch.Tensor], None]) -> None:
        super().__init__(gm)
        self.targets, self.visit = targets, visit

    def run_node(self, node: torch.fx.Node):
        value = super().run_node(node)
        if node in self.targets:
            self.visit(node, value)
        return value
