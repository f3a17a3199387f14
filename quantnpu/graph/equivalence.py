"""Whether two graphs compute the same function: the verifier's measurement.

`FunctionCheck` runs a graph on seeded random token ids (shape and vocabulary read from the
graph) and compares its logits with the reference graph's: relative difference
`max |logits - reference| / max |reference|`, computed in float64 when the graph can be cast to
it (then what is left is the rounding of rewritten weights to their storage dtype; node by node,
each weight read as float64 only while it is used, so the check costs the activations and one
weight, not a float64 copy of the model), else in the
graph's own dtype, with a `QuantNpuWarning` naming the op that failed in float64 and a tolerance
for that dtype (`graph_dtype_tolerance`).
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from quantnpu.diagnostics import warn
from quantnpu.errors import GraphStructureError, QuantNpuError
from quantnpu.graph.ops import EMBEDDING, EXPORT_ASSERTS, fetch_attr, tensor_meta

aten = torch.ops.aten


def tolerance_for(gm: torch.fx.GraphModule) -> float:
    """1e-6 for a float64 model, 1e-4 when rewritten weights are rounded to float32 or narrower."""
    dtypes = {p.dtype for p in gm.parameters() if p.is_floating_point()}
    return 1e-6 if dtypes == {torch.float64} else 1e-4


# The graph-dtype comparison's tolerance, in units of that dtype's epsilon. Both graphs then round
# every op, and differently once rewritten: measured, the float passes (Canonicalize .. FuseRotations,
# Hadamard R1/R2) move float32 logits by ~4 eps on the tiny test models and ~22 eps on SmolLM2-135M
# (30 layers, 128 tokens; 2.7e-6, where the float64 comparison reads 3.0e-7). 2^10 eps leaves ~45x
# headroom for deeper and wider models; for float32 it is 1.2e-4, the float64 check's 1e-4, so a
# change the float64 check catches above ~1e-4 is still caught. In float16 (1.0) or bfloat16 (8.0)
# it catches only gross changes, and the warning says so.
GRAPH_DTYPE_TOLERANCE_EPS = 2 ** 10


def graph_dtype_tolerance(dtype: torch.dtype) -> float:
    """The tolerance of a comparison computed in `dtype` (see GRAPH_DTYPE_TOLERANCE_EPS)."""
    return GRAPH_DTYPE_TOLERANCE_EPS * torch.finfo(dtype).eps


def _coarsest_float_dtype(gm: torch.fx.GraphModule, logits: torch.Tensor) -> torch.dtype:
    """The float dtype with the largest epsilon among the logits' and the parameters' and buffers'."""
    dtypes = {t.dtype for t in (*gm.parameters(), *gm.buffers(), logits) if t.is_floating_point()}
    return max(dtypes or {torch.float32}, key=lambda d: torch.finfo(d).eps)


def _describe_failure(node: torch.fx.Node | None, error: BaseException) -> str:
    """`%node (target): error`: the node whose run raised, and the error's first line."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if node is None:
        return f"{type(error).__name__}: {message}"
    target = node.target
    op = target if isinstance(target, (str, torch._ops.OpOverload)) else getattr(target, "__qualname__", target)
    return f"%{node.name} ({op}): {type(error).__name__}: {message}"


def sample_token_ids(gm: torch.fx.GraphModule, seed: int = 0) -> torch.Tensor:
    """Seeded random ids shaped like the graph's single integer input, below its vocabulary size."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value = tensor_meta(inputs[0]) if len(inputs) == 1 else None
    if value is None or value.dtype not in (torch.int64, torch.int32) or value.dim() != 2:
        raise GraphStructureError("the verifier needs one integer token-id input [batch, seq] with shape metadata")
    embedding = next((n for n in gm.graph.nodes if n.target == EMBEDDING), None)
    if embedding is None:
        raise GraphStructureError("the verifier found no embedding lookup to take the vocabulary size from")
    vocab = int(fetch_attr(gm, embedding.args[0].target).shape[0]) if embedding.args[0].op == "get_attr" else 2
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, tuple(value.shape), generator=generator, dtype=value.dtype)


def as_float64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy computing in float64 throughout: parameters, buffers, and the float32 casts models
    put inside RMSNorm and RoPE (and export's assertions on them)."""
    gm = copy.deepcopy(gm).double()
    for node in list(gm.graph.nodes):
        if node.target in EXPORT_ASSERTS:
            gm.graph.erase_node(node)
        elif node.target == aten.to.dtype and node.args[1] == torch.float32:
            node.args = (node.args[0], torch.float64) + tuple(node.args[2:])
        elif node.target in (aten.to.dtype_layout, aten._to_copy.default) and node.kwargs.get("dtype") == torch.float32:
            node.kwargs = {**node.kwargs, "dtype": torch.float64}
        elif node.target == aten.to.device and torch.float32 in node.args:
            node.args = tuple(torch.float64 if a == torch.float32 else a for a in node.args)
        elif node.target == aten.softmax.int and len(node.args) > 2 and node.args[2] == torch.float32:
            node.args = (node.args[0], node.args[1], torch.float64)
    gm.recompile()
    return gm


def _float64_args(node: torch.fx.Node) -> tuple[tuple, dict]:
    """`node`'s arguments with the float32 the model asks for (casts, softmax dtype) read as float64:
    the same rewrite `as_float64` makes in its copy's graph."""
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if node.target == aten.to.dtype and len(args) > 1 and args[1] == torch.float32:
        args = (args[0], torch.float64) + args[2:]
    elif node.target in (aten.to.dtype_layout, aten._to_copy.default) and kwargs.get("dtype") == torch.float32:
        kwargs["dtype"] = torch.float64
    elif node.target == aten.to.device and torch.float32 in args:
        args = tuple(torch.float64 if a == torch.float32 else a for a in args)
    elif node.target == aten.softmax.int and len(args) > 2 and args[2] == torch.float32:
        args = (args[0], args[1], torch.float64)
    return args, kwargs


class Float64Interpreter(torch.fx.Interpreter):
    """Runs a graph as `as_float64(gm)` would, without a float64 copy of the model: a floating
    parameter or buffer is read as float64 by each node that uses it, at that moment (export puts
    every get_attr at the top of the graph: fetched there, all of them would live at once), and the
    interpreter drops every value after its last use, so memory is the activations and one weight at
    a time, not twice the model. Export's assertions are skipped, as `as_float64` drops them."""

    _DEFERRED = object()
    failed_at: torch.fx.Node | None = None  # the node that raised, if one did


    def _value(self, node: torch.fx.Node):
        if node.op == "get_attr":
            value = self.fetch_attr(node.target)
            return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        return self.env[node]

    def run_node(self, node: torch.fx.Node):
        try:
            return self._run_node(node)
        except Exception:
            self.failed_at = node
            raise

    def _run_node(self, node: torch.fx.Node):
        if node.op == "get_attr":
            return self._DEFERRED
        if node.op == "placeholder":
            value = super().run_node(node)
            return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        if node.target in EXPORT_ASSERTS:
            return None
        args, kwargs = _float64_args(node) if node.op == "call_function" else (node.args, node.kwargs)
        args = torch.fx.node.map_arg(args, self._value)
        kwargs = torch.fx.node.map_arg(kwargs, self._value)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            # a submodule (rare after export) runs as a float64 copy of itself: small, and exact
            return copy.deepcopy(self.fetch_attr(node.target)).double()(*args, **kwargs)
        return args[0]  # output


def run_in_float64(gm: torch.fx.GraphModule, *inputs: torch.Tensor) -> object:
    """`as_float64(gm)(*inputs)`, computed node by node with one weight at a time in float64."""
    with torch.no_grad():
        return Float64Interpreter(gm).run(*inputs)


def logits_of(output: object) -> torch.Tensor:
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise GraphStructureError("the graph's first output is not a tensor (logits)")
    return output


class FunctionCheck:
    """The reference logits of one graph on seeded ids, and the distance of another graph's.

    In float64 when the reference runs in float64 (`tolerance_for`); else in the graph's dtype, with
    a `QuantNpuWarning` naming the op that prevented float64 and the tolerance used instead
    (`graph_dtype_tolerance` of the coarsest float dtype in play). `precision` says which; an
    explicit `tolerance` is used as given in either."""

    def __init__(self, reference: torch.fx.GraphModule, seed: int = 0, tolerance: float | None = None) -> None:
        self.ids = sample_token_ids(reference, seed)
        self.float64 = True
        self.precision = "float64"
        self.float64_failure: str | None = None  # the op (and error) that made the check fall back
        self.tolerance = tolerance_for(reference) if tolerance is None else tolerance
        with torch.no_grad():
            try:
                self.reference = self._float64_logits(reference)
            except (RuntimeError, TypeError):
                self.float64 = False
                logits = logits_of(reference(self.ids))
                dtype = _coarsest_float_dtype(reference, logits)
                self.precision = str(dtype).removeprefix("torch.")
                self.reference = logits.double()
                if tolerance is None:
                    basis = f"2^10 x the {self.precision} epsilon, in place of the float64 check's {self.tolerance:g}"
                    self.tolerance = graph_dtype_tolerance(dtype)
                else:
                    basis = "as given"
                gross = ": it catches only gross changes" if self.tolerance >= 1e-2 else ""
                warn(f"verifier: the graph cannot run in float64 (at {self.float64_failure}); comparing in {self.precision}, "
                     f"the graph's dtype, with tolerance {self.tolerance:g} ({basis}){gross}", stacklevel=2)

    def _float64_logits(self, gm: torch.fx.GraphModule) -> torch.Tensor:
        """The logits of `gm` computed in float64 (`Float64Interpreter`: no float64 copy of the model);
        on failure `float64_failure` names the op."""
        interpreter = Float64Interpreter(gm)
        try:
            return logits_of(interpreter.run(self.ids)).double()
        except (RuntimeError, TypeError) as error:
            self.float64_failure = _describe_failure(interpreter.failed_at, error)
            raise

    def _run(self, gm: torch.fx.GraphModule) -> torch.Tensor:
        with torch.no_grad():
            if not self.float64:
                return logits_of(gm(self.ids)).double()
            try:
                return self._float64_logits(gm)
            except (RuntimeError, TypeError) as error:
                raise QuantNpuError(f"verifier: the reference ran in float64 but this graph does not ({self.float64_failure}); "
                                    "it cannot be compared (PassManager(verify=False) skips the check)") from error

    def difference(self, gm: torch.fx.GraphModule) -> float:
        logits = self._run(gm)
        if logits.shape != self.reference.shape:
            return float("inf")
        scale = self.reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        return float((logits - self.reference).abs().max() / scale)

    def describe(self, difference: float) -> str:
        precision = self.precision if self.float64 else f"{self.precision} (the graph's dtype: float64 failed at {self.float64_failure})"
        return (f"logits differ from the input graph's by {difference:.3g} (relative, {precision}, "
                f"seeded random ids {tuple(self.ids.shape)}; tolerance {self.tolerance:g})")
