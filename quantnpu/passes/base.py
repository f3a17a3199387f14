"""The pass contract and the pass manager.

A pass is a `torch.fx` `PassBase`: `call(gm) -> PassResult`, `requires(gm)` and `ensures(gm)`
raise when a pre- or postcondition fails. It reads and writes only the graph module (nodes,
`node.meta`, parameters and buffers). Ordering constraints between pass classes are declared on
the later pass (`run_after`) and checked with torch's `this_before_that_pass_constraint`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import this_before_that_pass_constraint
from tqdm import tqdm

from quantnpu.errors import FunctionChangedError, GraphStructureError, InternalError, Interrupted, PassFailedError, QuantNpuError
from quantnpu.graph.equivalence import FunctionCheck
from quantnpu.memory import peak_memory

__all__ = ["GraphPass", "PassManager", "PassRecord", "PassResult"]


class GraphPass(PassBase):
    """Base of every quantnpu pass. Subclasses implement `call`, optionally `requires` and
    `ensures`, and list in `run_after` the pass classes that must run earlier when present."""

    run_after: tuple[type[GraphPass], ...] = ()
    # The verifier checks the function after a pass that should keep it; a pass that changes it
    # on purpose (quantization) says so, and verification ends there.
    preserves_function: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    summary: str
    # the verifier's relative logit difference from the input graph after this pass (None: not checked)
    function_difference: float | None = None
    # the largest resident size of the process while the pass (and its verification) ran, MiB
    peak_memory_mib: float | None = None


def _op_counts(gm: torch.fx.GraphModule) -> Counter:
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        key = node.op if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))
        counts[key] += 1
    return counts


def _summarize(before: Counter, after: Counter) -> str:
    changes = []
    for key in sorted(set(before) | set(after)):
        delta = after[key] - before[key]
        if delta:
            changes.append(f"{delta:+d} {key}")
    return ", ".join(changes) if changes else "no node added or removed"


class PassManager:
    """Run passes in order on a GraphModule.

    After every pass: `gm.graph.lint()`, `gm.recompile()`, and the pass's `ensures`. Each pass
    gets a `PassRecord` (time, node counts, a one-line summary of the op-count change).
    `stop_after` names a pass after which the run stops, so the intermediate graph can be seen.
    A `QuantNpuError` raised in a pass (the graph or a setting is not one it can take) is re-raised
    as `PassFailedError` naming the pass (and the node, when known): a user error. Anything else is a
    bug in quantnpu and is re-raised as `InternalError` naming the pass, the original chained.

    `verify` (on by default): the input graph's logits on seeded random token ids are the
    reference, and after each pass that `preserves_function`, up to the first one that does not,
    the graph must still compute them (`graph/equivalence.py`); the first pass that changed them is
    the one named. Turn it off only for a graph that is not a token-ids -> logits decoder.
    """

    def __init__(
        self,
        passes: Sequence[GraphPass],
        stop_after: str | None = None,
        progress: bool = False,
        verify: bool = True,
    ) -> None:
        self.verify = verify
        self.passes = list(passes)
        names = [p.name for p in self.passes]
        if stop_after is not None and stop_after not in names:
            raise QuantNpuError(f"stop_after={stop_after!r} names no pass in the pipeline {names}")
        self.stop_after = stop_after
        self.progress = progress
        self.records: list[PassRecord] = []
        self._check_order()

    def _check_order(self) -> None:
        pass_types = [type(p) for p in self.passes]
        for later in self.passes:
            for earlier in later.run_after:
                constraint = this_before_that_pass_constraint(earlier, type(later))
                for i, a in enumerate(pass_types):
                    for b in pass_types[i + 1:]:
                        if not constraint(a, b):
                            raise QuantNpuError(
                                f"pass order: {earlier.__name__} must run before {type(later).__name__}"
                            )

    def run(self, gm: torch.fx.GraphModule, start_after: str | None = None) -> torch.fx.GraphModule:
        """Run the passes on `gm` (in place where a pass rewrites in place). `start_after` names a
        pass whose output `gm` already is (e.g. the graph a `stop_after` run returned): the run
        continues after it, without verification (its reference was the original input)."""
        self.records = []
        passes = self.passes
        if start_after is not None:
            names = [p.name for p in passes]
            if start_after not in names:
                raise QuantNpuError(f"start_after={start_after!r} names no pass in the pipeline {names}")
            passes = passes[names.index(start_after) + 1:]
        check = None
        if self.verify and start_after is None and passes and passes[0].preserves_function:
            try:
                check = FunctionCheck(gm)
            except QuantNpuError as error:
                raise QuantNpuError(f"verifier: {error} (PassManager(verify=False) skips the check)") from error
        bar = tqdm(passes, desc="passes", disable=not self.progress, unit="pass")
        for graph_pass in bar:
            bar.set_postfix_str(graph_pass.name)
            before = _op_counts(gm)
            start = time.perf_counter()
            with peak_memory() as peak:
                gm, modified, check, difference = self._run_one(graph_pass, gm, check)
            after = _op_counts(gm)
            self.records.append(PassRecord(
                name=graph_pass.name,
                seconds=time.perf_counter() - start,
                modified=modified,
                nodes_before=sum(before.values()),
                nodes_after=sum(after.values()),
                summary=_summarize(before, after),
                function_difference=difference,
                peak_memory_mib=peak.mib,
            ))
            if graph_pass.name == self.stop_after:
                break
        return gm

    @staticmethod
    def _run_one(graph_pass: GraphPass, gm: torch.fx.GraphModule, check: FunctionCheck | None):
        """One pass, lint, recompile and the verifier: (graph, modified, the check still on, its difference)."""
        difference = None
        try:
            result = graph_pass(gm)
            if isinstance(result, PassResult):
                gm = result.graph_module
                modified = result.modified
            else:
                modified = True
            gm.graph.lint()
            gm.recompile()
            if check is not None and not graph_pass.preserves_function:
                check = None  # the function changes on purpose from here on
            if check is not None:
                difference = check.difference(gm)
                if not difference <= check.tolerance:
                    raise FunctionChangedError(f"it changed the function: {check.describe(difference)}")
        except (PassFailedError, InternalError, Interrupted):
            raise
        except QuantNpuError as error:  # the input: a graph or setting this pass cannot take
            raise PassFailedError(graph_pass.name, error) from error
        except Exception as error:  # noqa: BLE001 -- anything else is a bug in the pass: not the user's
            raise InternalError(graph_pass.name, error) from error
        return gm, modified, check, difference

    def report(self) -> str:
        """One line per pass: time, peak resident memory, node counts, verified logit difference (or -), op-count change."""
        return "\n".join(
            f"{r.name:<24} {r.seconds * 1000:8.1f} ms {r.peak_memory_mib / 1024:6.2f} GiB  {r.nodes_before:>5} -> {r.nodes_after:<5} nodes  "
            f"{'-' if r.function_difference is None else f'{r.function_difference:.1e}':>8}  {r.summary}"
            for r in self.records
        )


def require(condition: bool, message: str, node: torch.fx.Node | None = None) -> None:
    """Raise a GraphStructureError naming `node` unless `condition` holds."""
    if not condition:
        raise GraphStructureError(message, node.name if node is not None else None)
