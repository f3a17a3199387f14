"""SplitLeadingTokens: the first token(s) of the sequence take their own path through an MLP, with
their own 16-bit encodings, so that their massive activations stop setting everybody's scale.

Decoder LLMs put huge values on the first position ("attention sink" / massive activations; it is
the position, not the token). In SmolLM2-135M-Instruct on Brown text, some layers' down_proj input
and output are hundreds of times larger at position 0 than anywhere else (this pass's `report()`
lists each MLP's ratio): a static per-tensor 8-bit encoding sized for position 0 rounds every other
token's MLP output to zero.
Rotations cannot help (the value is one token's, not one channel's), and smoothing only moves it
into the weights. But an MLP is position-wise, so

    mlp(x) == cat([mlp(x[:, :k]), mlp(x[:, k:])], dim=1)

exactly, in float: the rewrite keeps the function (the verifier checks it) and nothing becomes
dynamic. Each half is a separate, static set of tensors with the plan's widths and encodings of its
own: the rest's scales no longer see position 0, and the leading copy's fit the outsized values
(bench/results/smoothing.md: rows with and without `lead`; the copy's widths can be raised alone with
`--override '*@leading.*=16'`). The two copies share the weights (one quantized
weight tensor); the `cat` is a 16-bit tensor, like the residual add it feeds.

Which layers: `auto` (default) splits a layer's MLP when, over the calibration windows, some tensor
of it has its largest magnitude on the leading tokens at least `threshold` times larger than on the
rest (a 2x ratio costs the other tokens a bit of resolution); `all` splits every MLP. The copy's
linears get the role `<role>@leading` (e.g. `layers.11.down_proj@leading`); the bit plan gives them
the rules of the role they copy, and `--override` patterns match both (`*.down_proj.input=16`
covers the two copies, `*@leading.*=16` the leading one alone). Each MLP's ratio and decision is
in `layers` and `report()`. With the split on, the pipeline has smoothing and sensitivity leave the
leading positions out of down_proj's statistics (the MLPs that end up not split have no outsized
leading tokens, by the threshold, so little is left out there).

Runs on the baked float graph (after BakeRotations: stage one and smoothing already folded into
the weights, which the two copies then share) and before PrepareForQnn, so observers, bit widths,
calibration and GPTQ (which skips the `@leading` copies and takes its Hessian from the rest) see the
split graph. Only MLPs are split: attention mixes positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from quantnpu.errors import GraphStructureError, QuantNpuError
from quantnpu.graph.meta import META_KEY, QUANT_KEY, node_info
from quantnpu.graph.ops import CASTS, GATE_ACTIVATIONS, LINEAR, insert_call
from quantnpu.quantizers.bit_plan import LEADING_TAG
from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.bake_rotations import BakeRotations
from quantnpu.passes.base import GraphPass, PassResult, require
from quantnpu.passes.stream import LayerStream

aten = torch.ops.aten

SPLIT_MODES = ("off", "auto", "all")
_MLP_ENTRIES = ("gate_proj", "up_proj")
# ops that act on each position alone (besides linear): elementwise maths and casts
_POSITION_WISE = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default, aten.sigmoid.default,
    aten.tanh.default, aten.relu.default, aten.pow.Tensor_Scalar, aten.clamp.default, *GATE_ACTIVATIONS, *CASTS,
}


def is_leading_role(role: str) -> bool:
    return role.endswith(LEADING_TAG)


@dataclass(frozen=True)
class LeadingTokenSplit:
    """`mode`: off, auto (split the MLPs whose leading tokens are `threshold` times larger than the
    rest somewhere) or all; `tokens`: how many leading positions take the separate path."""

    mode: str = "auto"
    tokens: int = 1
    threshold: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in SPLIT_MODES:
            raise QuantNpuError(f"leading-token split mode {self.mode!r}: choose one of {', '.join(SPLIT_MODES)}")
        if self.tokens < 1:
            raise QuantNpuError(f"leading-token split needs at least 1 token, got {self.tokens}")
        if not self.threshold >= 1.0:
            raise QuantNpuError(f"leading-token split threshold must be >= 1, got {self.threshold}")


@dataclass(frozen=True)
class MlpSplit:
    layer: int
    ratio: float    # largest |value| on the leading tokens / on the rest, over the MLP's tensors
    tensor: str     # the node where that ratio is largest
    split: bool


@dataclass
class _Mlp:
    layer: int
    input: torch.fx.Node
    down: torch.fx.Node
    nodes: list[torch.fx.Node]   # the MLP's computation, graph order, from the entry linears to down


def _reaches(starts, step) -> set[torch.fx.Node]:
    seen, stack = set(), list(starts)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(step(node))
    return seen


def _is_constant(node: torch.fx.Node) -> bool:
    return all(n.op == "get_attr" or (n.op == "call_function" and not n.all_input_nodes)
               for n in _reaches([node], lambda n: n.all_input_nodes))


def _sequence_length(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 3:
        raise GraphStructureError("MLP input is not a (batch, sequence, hidden) tensor", node.name)
    return int(value.shape[1])


def find_mlps(gm: torch.fx.GraphModule) -> list[_Mlp]:
    """Each decoder layer's MLP: gate/up linears reading one input, down_proj at the end, and
    nothing in between that reads another activation or mixes positions (else an error naming it)."""
    linears: dict[int, dict[str, torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        info = node_info(node)
        if node.target == LINEAR and info is not None and info.layer is not None and not is_leading_role(info.role):
            linears.setdefault(info.layer, {})[info.kind] = node
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    mlps = []
    for layer, found in sorted(linears.items()):
        down = found.get("down_proj")
        entries = [found[k] for k in _MLP_ENTRIES if k in found]
        if down is None or not entries:
            continue
        x = entries[0].args[0]
        if any(e.args[0] is not x for e in entries):
            raise GraphStructureError(f"layer {layer}: gate_proj and up_proj read different tensors", entries[-1].name)
        nodes = _reaches(entries, lambda n: n.users) & _reaches([down], lambda n: n.all_input_nodes)
        if down not in nodes:
            raise GraphStructureError(f"layer {layer}: down_proj is not computed from gate_proj/up_proj", down.name)
        length = _sequence_length(x)
        for node in nodes:
            if node.target != LINEAR and node.target not in _POSITION_WISE:
                raise GraphStructureError(f"layer {layer}: {node.target} in the MLP is not known to act per position", node.name)
            for arg in node.all_input_nodes:
                if arg in nodes or arg is x:
                    continue
                if not _is_constant(arg):
                    raise GraphStructureError(f"layer {layer}: the MLP reads {arg.name}, which is neither its input nor a constant",
                                              node.name)
                value = arg.meta.get("val")
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
                sequence_axis = len(shape) - node.meta["val"].dim() + 1  # dimension 1, right-aligned broadcasting
                if node.target != LINEAR and sequence_axis >= 0 and shape[sequence_axis] != 1:
                    raise GraphStructureError(f"layer {layer}: constant {arg.name} varies along the sequence", node.name)
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor) or value.dim() < 3 or int(value.shape[1]) != length:
                raise GraphStructureError(f"layer {layer}: MLP tensor without the sequence in dimension 1", node.name)
        mlps.append(_Mlp(layer, x, down, sorted(nodes, key=order.__getitem__)))
    return mlps


def _leading_meta(node: torch.fx.Node, copy: torch.fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace"):
        if key in node.meta:
            copy.meta[key] = node.meta[key]
    info = node_info(node)
    if info is not None:
        copy.meta[META_KEY] = dataclasses.replace(info, role=info.role + LEADING_TAG)
    record = node.meta.get(QUANT_KEY)
    if record is not None:  # the same plan (promotion, the weight's learned encoding), its own input range
        copy.meta[QUANT_KEY] = dataclasses.replace(record, learned_input=None)


def _copy_path(graph: torch.fx.Graph, mlp: _Mlp, source: torch.fx.Node, leading: bool) -> torch.fx.Node:
    mapping = {mlp.input: source}
    for node in mlp.nodes:
        args = torch.fx.node.map_arg(node.args, lambda a: mapping.get(a, a))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: mapping.get(a, a))
        copy = insert_call(graph, mlp.down, node.target, *args, **kwargs)
        if leading:
            _leading_meta(node, copy)
        else:
            copy.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        mapping[node] = copy
    return mapping[mlp.down]


def split_mlp(gm: torch.fx.GraphModule, mlp: _Mlp, tokens: int) -> torch.fx.Node:
    """Rewrite one MLP as cat([mlp(x[:, :tokens]), mlp(x[:, tokens:])], 1); returns the cat."""
    graph = gm.graph
    length = _sequence_length(mlp.input)
    if tokens >= length:
        raise GraphStructureError(f"cannot split {tokens} leading tokens off a sequence of {length}", mlp.input.name)
    head = insert_call(graph, mlp.down, aten.slice.Tensor, mlp.input, 1, 0, tokens)
    rest = insert_call(graph, mlp.down, aten.slice.Tensor, mlp.input, 1, tokens, length)
    head_out = _copy_path(graph, mlp, head, leading=True)
    rest_out = _copy_path(graph, mlp, rest, leading=False)
    joined = insert_call(graph, mlp.down, aten.cat.default, [head_out, rest_out], 1)
    mlp.down.replace_all_uses_with(joined)
    for node in reversed(mlp.nodes):
        graph.erase_node(node)
    return joined


class SplitLeadingTokens(GraphPass):
    """See the module docstring."""

    run_after = (AnnotateRoles, BakeRotations)

    def __init__(self, calibration: Sequence[torch.Tensor] = (), config: LeadingTokenSplit = LeadingTokenSplit(),
                 progress: bool = False) -> None:
        self.calibration, self.config, self.progress = list(calibration), config, progress
        self.layers: list[MlpSplit] = []

    def _ratios(self, gm: torch.fx.GraphModule, mlps: list[_Mlp]) -> dict[int, tuple[float, str]]:
        require(bool(self.calibration), "the auto leading-token split needs calibration batches")
        k = self.config.tokens
        watched = {n: mlp.layer for mlp in mlps for n in mlp.nodes}
        head = dict.fromkeys(watched, 0.0)
        rest = dict.fromkeys(watched, 0.0)

        def visit(node, value):
            a = value.detach().abs()
            head[node] = max(head[node], float(a[:, :k].amax()))
            rest[node] = max(rest[node], float(a[:, k:].amax()))

        with torch.no_grad():
            LayerStream(gm).run(self.calibration, visit, targets=set(watched),
                                progress="leading-token ranges" if self.progress else None)
        best: dict[int, tuple[float, str]] = {}
        for node, layer in watched.items():
            ratio = head[node] / max(rest[node], 1e-30)
            if layer not in best or ratio > best[layer][0]:
                info = node_info(node)
                best[layer] = (ratio, f"{info.role}.output" if node.target == LINEAR and info is not None
                               else f"{node.name} = {getattr(node.target, '__name__', node.target)}")
        return best

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.layers = []
        if self.config.mode == "off":
            return PassResult(gm, False)
        mlps = find_mlps(gm)
        require(bool(mlps), "no MLP (gate/up/down_proj) found: run AnnotateRoles first")
        for mlp in mlps:
            if self.config.tokens >= _sequence_length(mlp.input):
                raise GraphStructureError(f"cannot split {self.config.tokens} leading tokens off a sequence of "
                                          f"{_sequence_length(mlp.input)}", mlp.input.name)
        ratios = self._ratios(gm, mlps) if self.config.mode == "auto" else {}
        for mlp in mlps:
            ratio, where = ratios.get(mlp.layer, (float("nan"), ""))
            split = self.config.mode == "all" or ratio >= self.config.threshold
            self.layers.append(MlpSplit(mlp.layer, ratio, where, split))
            if split:
                split_mlp(gm, mlp, self.config.tokens)
        gm.graph.lint()
        return PassResult(gm, any(s.split for s in self.layers))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        copied = {i.layer for n in gm.graph.nodes
                  if n.target == LINEAR and (i := node_info(n)) is not None and is_leading_role(i.role) and i.kind == "down_proj"}
        if self.layers:
            require(copied == {s.layer for s in self.layers if s.split}, "leading-token copies do not match the split MLPs")

    def report(self) -> str:
        """One line per MLP: the leading/rest ratio and whether it was split."""
        k = self.config.tokens
        lines = []
        for s in self.layers:
            ratio = "" if s.ratio != s.ratio else f"max |x| first {k} / rest = {s.ratio:8.1f} ({s.tensor})"
            lines.append(f"layers.{s.layer}.mlp  {ratio}  {'split' if s.split else 'kept'}")
        return "\n".join(lines)
