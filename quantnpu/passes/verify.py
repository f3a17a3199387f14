"""The function-preservation verifier as a pass.

`PassManager(verify=True)` (the default) checks after every pass that declares
`preserves_function` and names the first pass whose output moved the logits beyond tolerance;
`VerifyFunction(reference)` is the same check (`quantnpu.graph.equivalence.FunctionCheck`) as an
explicit pass.
"""

from __future__ import annotations

import torch.fx

from quantnpu.errors import FunctionChangedError
from quantnpu.graph.equivalence import FunctionCheck
from quantnpu.passes.base import GraphPass, PassResult


class VerifyFunction(GraphPass):
    """Fail unless the graph computes `reference`'s function (module docstring)."""

    preserves_function = True

    def __init__(self, reference: torch.fx.GraphModule, seed: int = 0, tolerance: float | None = None) -> None:
        self.check = FunctionCheck(reference, seed, tolerance)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        difference = self.check.difference(gm)
        if not difference <= self.check.tolerance:
            raise FunctionChangedError(f"the function changed: {self.check.describe(difference)}")
        return PassResult(gm, False)
