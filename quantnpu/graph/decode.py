"""Two graphs from one decoder: a prefill that writes a KV cache and a decode step that reads it.

A recognized decoder graph (`input_ids [B, S] -> logits [B, S, V]`, after Canonicalize,
FoldConstants and AnnotateRoles; the later float passes, PrepareForQnn and the observers of
stage two may have run too) is rewritten, not re-exported: `derive_prefill(gm, P)` and
`derive_decode(gm, C)` copy its graph and share its weights and observer modules (the same
objects), so whatever later rewrites a weight or sets an encoding does it for both programs. Node
names are kept (a node of a derived graph has its source node's name); the new nodes are the
inputs, the cache concatenations and the table gathers.

How the rewrite knows what to change. Every tensor's token axes are found by propagation from
the ids input through the ops the rewrite understands (pointwise ops with broadcasting, views,
transposes, linears, norms, matmuls, attention), never by matching a size: the sequence length
may equal the head dim. Two kinds of token axis: the *query* tokens (the ones this call
computes) and, past the cache, the *key* tokens (every position attended). Reshape, view and
expand arguments are rewritten on the token axes alone. A constant that broadcasts against a
token axis is a per-position table (RoPE cos/sin, any other position table): token i of the
full-sequence graph is at position i, so row p is position p's. A constant with a key axis is
the attention mask; it must be causal (a sliding window narrower than the sequence, or any
other mask, is refused). Anything else that touches a token axis (a cumulative sum, a slice of
the tokens as SplitLeadingTokens makes, a reduction over tokens, an op not in the tables below,
a mask read by anything but an add or SDPA) is a `GraphStructureError` naming the node. After
the rewrite every node's shape is recomputed (fake tensors) and must be its source shape with
the token axes resized: a disagreement is an error naming the node, never a different program.

What is cached: per layer, the key after RoPE and the value, each before any grouped-query
repeat and before any scaling, in `[B, kv_heads, tokens, head_dim]` layout (the tensor on the
path into the attention where that layout is last seen before the repeat). Why there: it is
the smallest tensor that is exact (`heads / kv_heads` times smaller than the repeated one); it
is the same tensor in every graph form (PrepareForQnn splits the attention scale as
sqrt(scale) on q and on the *repeated, transposed* k, downstream of this point, so the split
does not move it); and RoPE is applied once, when the token is computed. Its encoding is the
RoPE output's (16 bits in today's bit plan), so the quantization step must give this tensor
the plan's KV bits on purpose, the same in both graphs.

Prefill (`derive_prefill(gm, P)`, P <= S): inputs `input_ids [B, P]` at positions 0..P-1;
outputs `(logits [B, P, V], k_0 .. k_{L-1}, v_0 .. v_{L-1})`, each K/V `[B, kv_heads, P, D]`,
what the P tokens write into cache slots 0..P-1. Its mask and position tables are constants
(the first P rows), so with P = S it is the source graph plus the K/V outputs. A prompt of
t < P tokens is padded on the right: the causal mask keeps the t real tokens from reading the
padding, and the runner keeps only the first t slots (`KvCacheRunner`).

Decode (`derive_decode(gm, C, T=1)`, C + T <= S): inputs `(input_ids [B, T], input_pos [T]
int64, attention_mask, k_cache_0 .. , v_cache_0 ..)` with each cache `[B, kv_heads, C, D]`;
outputs `(logits [B, T, V], k_new_0 .., v_new_0 ..)`, only the T new K/V (as ExecuTorch's
static_llama with `output_new_cache_only`); the caller writes them into slots
`input_pos`. The position tables are gathered by `input_pos` from the full-sequence graph's
constant tables (`index_select`); the attention reads `cat(cache, new)` along the token axis,
so key j < C is cache slot j and key C + i the new token i. `attention_mask` is additive,
shaped like the source mask with axes (query T, key C + T), in the graph's float dtype: 0 where
a query may attend, `CachedGraph.mask_value` elsewhere (the source mask's own masking value: -inf for
a boolean mask, -255 after PrepareForQnn). T > 1 is a chunk at any position (chunked prefill).

Under stage two's observers (the fake-quant graph just before conversion) an observer is the
identity on shapes: the cached K/V is the observer's output (the cache holds values on the
tensor's grid), a table or mask is replaced under its observer (which stays, now on the gather
or the mask input), and running either graph feeds the shared observers. Which encoding the
cache gets (today K's is the 16-bit RoPE output's) is the quantization step's decision.

Not supported yet: positions >= S (the folded tables and the mask end there: export at the
context length wanted), sliding-window masks narrower than S, caches shared across layers
(each attention must have its own), batch rows at different positions, and converted
Q/DQ graphs (derive before conversion and convert both; `quantnpu.passes.decode_quant` does).

SplitLeadingTokens' split (`cat([mlp(x[:, :k]), mlp(x[:, k:])])`) is the one slice of the tokens
understood: in a prefill the head keeps its k tokens and the rest is resized to P - k (position 0
only ever runs through the prefill); a decode graph is derived from `unsplit_leading_tokens(gm)`,
where the rest copy reads every token, so decode steps use the rest's encodings.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.graph.meta import node_info, nodes_by_role
from quantnpu.graph.ops import CASTS, EMBEDDING, LINEAR, SDPA, SOFTMAX, fetch_attr, quantize_kind, tensor_meta

aten = torch.ops.aten
QUERY, KEY = "query", "key"
# SplitLeadingTokens' two halves of the query tokens in a prefill: the first `lead` positions
# (`x[:, :lead]`, never resized) and the rest (`x[:, lead:]`, resized to P - lead).
LEAD, REST = "lead", "rest"
_FULL_SLICE_END = sys.maxsize

# Ops computing each element from the same element of their (broadcast) operands.
_POINTWISE = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.log.default, aten.tanh.default,
    aten.sigmoid.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.erf.default,
    aten.where.self, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.maximum.default,
    aten.minimum.default, aten.reciprocal.default, aten.abs.default, aten.alias.default, aten.clone.default,
    aten.contiguous.default, aten.detach.default, aten.hardtanh.default,
} | CASTS
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction}
_MATMULS = {aten.matmul.default, aten.bmm.default, aten.mm.default}
# Ops the walk from an attention operand back to the cached tensor goes through (the grouped-query
# repeat, the transposes into the score matmul, the scale PrepareForQnn puts on k, bmm's flattening).
_REPEAT = {aten.unsqueeze.default, aten.expand.default}
_MOVES = _RESHAPES | _REPEAT | {aten.transpose.int, aten.permute.default, aten.squeeze.dim} | CASTS \
    | {aten.clone.default, aten.contiguous.default, aten.alias.default}


@dataclass(frozen=True)
class CachedGraph:
    """A derived graph and what its inputs and outputs are (see the module docstring).

    `kind` "prefill" or "decode"; `tokens` (P or T) per call; `cache_slots` C (0 for prefill);
    `context` S, the source graph's sequence length (no position at or beyond it);
    `layers`; `k_shapes` / `v_shapes` the per-layer cache shapes `[B, kv_heads, C, D]` (decode) or
    the written K/V `[B, kv_heads, P, D]` (prefill); `mask_shape` the decode mask's shape (None in
    a prefill); `mask_value` the additive masking value; `cached` the source nodes' names of the
    cached K and V per layer."""

    module: torch.fx.GraphModule
    kind: str
    tokens: int
    cache_slots: int
    context: int
    layers: int
    k_shapes: tuple[tuple[int, ...], ...]
    v_shapes: tuple[tuple[int, ...], ...]
    mask_shape: tuple[int, ...] | None
    mask_value: float
    float_dtype: torch.dtype
    cached: tuple[tuple[str, str], ...] = field(default=())

    def __call__(self, *args: torch.Tensor):
        return self.module(*args)


# ---- token-axis propagation ----------------------------------------------------------------

Axes = dict[int, str]


def _is_observer(gm: torch.fx.GraphModule, node: object) -> bool:
    """A PT2E observer or fake-quantizer call: the identity on shapes (it observes, or quantize-
    dequantizes with a per-tensor or per-channel encoding of a weight)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_module":
        return False
    return _observer_module(gm.get_submodule(node.target))


def _observer_module(module: torch.nn.Module) -> bool:
    from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase

    return isinstance(module, (ObserverBase, FakeQuantizeBase))


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    source = node
    while tensor_meta(source) is None and source.op == "call_module" and source.args \
            and isinstance(source.args[0], torch.fx.Node):  # an observer's output: its input's shape
        source = source.args[0]
    value = tensor_meta(source)
    if value is None:
        raise GraphStructureError("no shape metadata (meta['val']) on a node the decode rewrite must resize", node.name)
    return tuple(int(d) for d in value.shape)


def _has_shape(node: torch.fx.Node) -> bool:
    try:
        _shape(node)
    except GraphStructureError:
        return False
    return True


def _dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


@dataclass
class _Propagation:
    """Token axes of every node computed from the ids, and of the constants broadcast against them."""

    gm: torch.fx.GraphModule
    seq_len: int
    axes: dict[torch.fx.Node, Axes] = field(default_factory=dict)
    constants: dict[torch.fx.Node, Axes] = field(default_factory=dict)  # position tables and masks
    mask_readers: dict[torch.fx.Node, list[torch.fx.Node]] = field(default_factory=dict)
    keys: list[torch.fx.Node] = field(default_factory=list)     # attention operands: keys ...
    values: list[torch.fx.Node] = field(default_factory=list)   # ... and values, in graph order
    causal_sdpa: list[torch.fx.Node] = field(default_factory=list)
    relabel: frozenset = frozenset()  # nodes whose readers see their token axis as key tokens
    lead: int | None = None           # leading tokens split off by SplitLeadingTokens (None: no split)
    splits: list[torch.fx.Node] = field(default_factory=list)  # the cats joining the two halves

    def set_lead(self, lead: int, node: torch.fx.Node) -> None:
        if self.lead is not None and self.lead != lead:
            raise GraphStructureError(f"token splits at {self.lead} and at {lead}: one leading-token split only", node.name)
        self.lead = lead

    def of(self, arg: object) -> Axes | None:
        if not isinstance(arg, torch.fx.Node) or arg not in self.axes:
            return None
        axes = self.axes[arg]
        return {a: KEY for a in axes} if arg in self.relabel else axes

    def constant_axes(self, operand: torch.fx.Node, out_axes: Axes, out_rank: int, reader: torch.fx.Node) -> None:
        """`operand` (no token axes of its own) broadcast against `out_axes`: where it is not 1 along
        a token axis, it is a per-position constant."""
        while _is_observer(self.gm, operand):  # the constant itself: its observer stays on what replaces it
            operand = operand.args[0]
        shape = _shape(operand)
        found: Axes = {}
        for out_axis, kind in out_axes.items():
            axis = out_axis - (out_rank - len(shape))
            if axis < 0 or shape[axis] == 1:
                continue
            if shape[axis] != self.seq_len:
                raise GraphStructureError(f"operand of size {shape[axis]} broadcast against a token axis of {self.seq_len}", reader.name)
            found[axis] = kind
        if not found:
            return
        if not _is_constant(self.gm, operand):
            raise GraphStructureError("a value computed from the inputs is used per position but carries no token axis "
                                      "the decode rewrite can follow", operand.name)
        if self.constants.get(operand, found) != found:
            raise GraphStructureError("constant read along different token axes by different ops", operand.name)
        self.constants[operand] = found
        if KEY in found.values() or len(found) > 1:
            self.mask_readers.setdefault(operand, []).append(reader)


def _is_constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Computed from the module's attributes alone (the ops FoldConstants would fold, observed or not)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder" or current.op == "call_module" and not _is_observer(gm, current):
            return False
        stack.extend(current.all_input_nodes)
    return True


def _pointwise(prop: _Propagation, node: torch.fx.Node, operands: Sequence[object]) -> Axes:
    out_rank = len(_shape(node))
    out: Axes = {}
    for operand in operands:
        axes = prop.of(operand)
        if not axes:
            continue
        shift = out_rank - len(_shape(operand))
        for axis, kind in axes.items():
            if out.get(axis + shift, kind) != kind:
                raise GraphStructureError("combines query and key token axes elementwise", node.name)
            out[axis + shift] = kind
    for operand in operands:
        if isinstance(operand, torch.fx.Node) and prop.of(operand) is None and _has_shape(operand):
            prop.constant_axes(operand, out, out_rank, node)
    return out


def _reshape(node: torch.fx.Node, source: torch.fx.Node, axes: Axes) -> Axes:
    """A token axis survives a reshape when the dims before it hold as many elements before and
    after, and its size is kept: it is neither merged with another dim nor split."""
    before, after = _shape(source), _shape(node)
    out: Axes = {}
    for axis, kind in axes.items():
        prefix = math.prod(before[:axis])
        match = [b for b in range(len(after)) if math.prod(after[:b]) == prefix and after[b] == before[axis]]
        if len(match) != 1:
            raise GraphStructureError("reshape merges or splits a token axis", node.name)
        out[match[0]] = kind
    return out


def _matmul(prop: _Propagation, node: torch.fx.Node) -> Axes:
    a, b = node.args[0], node.args[1]
    a_axes, b_axes = prop.of(a) or {}, prop.of(b) or {}
    a_rank, b_rank, out_rank = len(_shape(a)), len(_shape(b)), len(_shape(node))
    if a_rank < 2 or b_rank < 2:
        raise GraphStructureError("matrix-vector product on token-carrying operands", node.name)
    if a_axes.get(a_rank - 1) != b_axes.get(b_rank - 2):
        raise GraphStructureError("matmul contracts a token axis with a different axis", node.name)
    out: Axes = {}
    for axes, rank in ((a_axes, a_rank), (b_axes, b_rank)):
        for axis, kind in axes.items():
            if axis < rank - 2 and out.setdefault(axis + out_rank - rank, kind) != kind:
                raise GraphStructureError("matmul batches query and key token axes together", node.name)
    if a_rank - 2 in a_axes:
        out[out_rank - 2] = a_axes[a_rank - 2]
    if b_rank - 1 in b_axes:
        out[out_rank - 1] = b_axes[b_rank - 1]
    if b_axes and not a_axes:
        raise GraphStructureError("matmul of a constant by token-carrying values", node.name)
    if b_axes:  # an attention product: b is a key (tokens last, the scores) or a value (tokens contracted)
        if b_rank - 1 in b_axes and b_rank - 2 not in b_axes:
            prop.keys.append(b)
        elif b_rank - 2 in b_axes and b_rank - 1 not in b_axes:
            prop.values.append(b)
        else:
            raise GraphStructureError("matmul of two token-carrying tensors that is not q k^T or probabilities @ v", node.name)
    return out


def _sdpa(prop: _Propagation, node: torch.fx.Node) -> Axes:
    query, key, value = node.args[:3]
    q_axes, k_axes, v_axes = prop.of(query) or {}, prop.of(key) or {}, prop.of(value) or {}
    rank = len(_shape(query))
    if set(q_axes) != {rank - 2} or set(k_axes) != {rank - 2} or k_axes != v_axes:
        raise GraphStructureError("attention inputs are not [..., tokens, head_dim]", node.name)
    prop.keys.append(key)
    prop.values.append(value)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    if isinstance(mask, torch.fx.Node):
        if prop.of(mask) is not None:
            raise GraphStructureError("attention mask computed from the inputs (e.g. a padding mask from the ids) "
                                      "is not supported", mask.name)
        scores_rank = len(_shape(node))
        prop.constant_axes(mask, {scores_rank - 2: q_axes[rank - 2], scores_rank - 1: k_axes[rank - 2]}, scores_rank, node)
        if mask not in prop.constants:
            raise GraphStructureError("attention mask has no token axes", mask.name)
    if causal:
        prop.causal_sdpa.append(node)
    return dict(q_axes)


def _propagate(gm: torch.fx.GraphModule, ids: torch.fx.Node, seq_len: int, relabel=frozenset()) -> _Propagation:
    prop = _Propagation(gm, seq_len, relabel=frozenset(relabel))
    prop.axes[ids] = {1: QUERY}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if node.target.startswith("_guards"):
                continue
            if _is_observer(gm, node) and prop.of(node.args[0]) is not None:
                prop.axes[node] = dict(prop.of(node.args[0]))
            elif any(prop.of(a) for a in node.all_input_nodes):
                raise GraphStructureError(f"module call {node.target} on token-carrying values is not supported "
                                          "by the decode rewrite", node.name)
            continue
        if node.op != "call_function" or not any(prop.of(a) is not None for a in node.all_input_nodes):
            continue
        prop.axes[node] = _rule(prop, node)
    return prop


def _rule(prop: _Propagation, node: torch.fx.Node) -> Axes:
    target, args = node.target, node.args
    first = args[0] if args else None
    axes = prop.of(first) or {}
    rank = len(_shape(node))
    if target in _POINTWISE:
        return _pointwise(prop, node, list(args) + list(node.kwargs.values()))
    if target == EMBEDDING:
        if prop.of(args[0]):
            raise GraphStructureError("embedding table computed from the inputs", node.name)
        return dict(prop.of(args[1]))
    if target == LINEAR:
        in_rank = len(_shape(first))
        if in_rank - 1 in axes or any(prop.of(a) for a in args[1:]):
            raise GraphStructureError("linear over the token axis", node.name)
        return dict(axes)
    if target in _RESHAPES:
        return _reshape(node, first, axes)
    if target == aten.expand.default:
        shift = rank - len(_shape(first))
        return {axis + shift: kind for axis, kind in axes.items()}
    if target == aten.transpose.int:
        d0, d1 = _dim(args[1], rank), _dim(args[2], rank)
        swap = {d0: d1, d1: d0}
        return {swap.get(axis, axis): kind for axis, kind in axes.items()}
    if target == aten.permute.default:
        order = [_dim(d, rank) for d in args[1]]
        return {order.index(axis): kind for axis, kind in axes.items()}
    if target == aten.unsqueeze.default:
        dim = _dim(args[1], rank)
        return {axis + (axis >= dim): kind for axis, kind in axes.items()}
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.select.int):
        in_rank = len(_shape(first))
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = sorted({_dim(d, in_rank) for d in dims if target == aten.select.int or _shape(first)[_dim(d, in_rank)] == 1})
        if any(d in axes for d in dims):
            raise GraphStructureError("selects or squeezes a token axis", node.name)
        return {axis - sum(d < axis for d in dims): kind for axis, kind in axes.items()}
    if target == aten.slice.Tensor:
        dim = _dim(args[1] if len(args) > 1 else 0, rank)
        start = args[2] if len(args) > 2 else None
        end = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        whole_end = end is None or end >= prop.seq_len
        if dim not in axes or (start in (None, 0) and whole_end and step == 1):
            return dict(axes)
        if axes[dim] == QUERY and step == 1 and start in (None, 0) and 0 < end < prop.seq_len:
            prop.set_lead(end, node)  # SplitLeadingTokens' head: the first positions, whatever P is
            return {**axes, dim: LEAD}
        if axes[dim] == QUERY and step == 1 and isinstance(start, int) and 0 < start < prop.seq_len and whole_end:
            prop.set_lead(start, node)  # ... and its rest
            return {**axes, dim: REST}
        raise GraphStructureError(f"slices the token axis ({start}:{end}:{step}); a decode graph computes other "
                                  "tokens (only SplitLeadingTokens' leading/rest split is understood)", node.name)
    if target == aten.cat.default:
        pieces = [p for p in args[0]]
        dim = _dim(args[1] if len(args) > 1 else 0, rank)
        kinds = [prop.of(p) for p in pieces]
        if len(pieces) == 2 and kinds[0] and kinds[1] and kinds[0].get(dim) == LEAD and kinds[1].get(dim) == REST \
                and {a: k for a, k in kinds[0].items() if a != dim} == {a: k for a, k in kinds[1].items() if a != dim}:
            prop.splits.append(node)  # the leading-token split joined again
            return {**kinds[0], dim: QUERY}
        if len(pieces) == 1 and kinds[0]:
            return dict(kinds[0])  # one piece: the identity (the decode graph's form of a split's join)
        if any(k != kinds[0] for k in kinds) or dim in (kinds[0] or {}):
            raise GraphStructureError("concatenation along, or of operands without, the token axis", node.name)
        return dict(kinds[0])
    if target in _REDUCTIONS:
        in_rank = len(_shape(first))
        dims = args[1] if len(args) > 1 else None
        dims = list(range(in_rank)) if dims is None else [_dim(d, in_rank) for d in ([dims] if isinstance(dims, int) else dims)]
        keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        if any(d in axes for d in dims):
            raise GraphStructureError("reduction over a token axis", node.name)
        return dict(axes) if keep else {a - sum(d < a for d in dims): k for a, k in axes.items()}
    if target in SOFTMAX or target == aten._log_softmax.default:
        return dict(axes)
    if target == aten.rms_norm.default:
        normalized = len(args[1])
        if any(a >= rank - normalized for a in axes) or any(prop.of(a) for a in args[2:]):
            raise GraphStructureError("RMSNorm over a token axis", node.name)
        return dict(axes)
    if target in _MATMULS:
        return _matmul(prop, node)
    if target == SDPA:
        return _sdpa(prop, node)
    raise GraphStructureError(f"{target} on token-carrying values is not understood by the decode rewrite", node.name)


# ---- what is cached ---------------------------------------------------------------------------

def _cached_tensor(prop: _Propagation, operand: torch.fx.Node) -> torch.fx.Node:
    """The K or V tensor to cache: walking back from the attention operand through data movement
    (bmm's flattening, transposes, the grouped-query repeat) and a scalar scale, the last tensor in
    `[B, heads, tokens, head_dim]` layout before any repeat or scale."""
    chain = [operand]
    while True:
        node = chain[-1]
        moves = node.op == "call_function" and node.target in _MOVES or _is_observer(prop.gm, node)
        if not moves and node.op == "call_function" and node.target in (aten.mul.Tensor, aten.div.Tensor):
            other = node.args[1]
            moves = isinstance(node.args[0], torch.fx.Node) and (
                isinstance(other, (int, float)) or (isinstance(other, torch.fx.Node) and _is_constant(prop.gm, other)
                                                    and math.prod(_shape(other)) == 1))
        if not moves or not isinstance(node.args[0], torch.fx.Node) or node.args[0] not in prop.axes:
            break
        chain.append(node.args[0])
    chain.reverse()  # from the producer towards the attention
    candidates = []
    for node in chain:
        if node.op == "call_function" and node.target in _REPEAT | {aten.mul.Tensor, aten.div.Tensor} and node is not chain[0]:
            break
        if len(_shape(node)) == 4 and prop.axes.get(node) == {2: QUERY}:
            candidates.append(node)
    if not candidates:
        raise GraphStructureError("no [batch, heads, tokens, head_dim] tensor found on the way into the attention "
                                  "to cache", operand.name)
    return candidates[-1]


def _layer_of(node: torch.fx.Node, kinds: tuple[str, ...]) -> int:
    """The layer of the nearest k/v projection (or k norm) the tensor is computed from."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop(0)
        info = node_info(current)
        if info is not None and info.kind in kinds and info.layer is not None:
            return info.layer
        for source in current.all_input_nodes:
            if source not in seen:
                seen.add(source)
                frontier.append(source)
    raise GraphStructureError(f"cached tensor is not computed from any {' or '.join(kinds)}", node.name)


@dataclass
class _Decoder:
    """What the rewrite found in the source graph."""

    ids: torch.fx.Node
    output: torch.fx.Node
    seq_len: int
    batch: int
    layers: int
    k_cached: list[torch.fx.Node]   # per layer
    v_cached: list[torch.fx.Node]
    prop: _Propagation              # with key tokens past the cached tensors
    float_dtype: torch.dtype


def _float_dtype(gm: torch.fx.GraphModule) -> torch.dtype:
    for tensor in (*gm.parameters(), *gm.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _analyze(gm: torch.fx.GraphModule) -> _Decoder:
    """Find the ids input, the token axes and the cached K/V of an annotated decoder graph."""
    by_role = nodes_by_role(gm)
    if "embedding" not in by_role or "lm_head" not in by_role:
        raise GraphStructureError("no decoder roles on the graph: run Canonicalize, FoldConstants and AnnotateRoles first")
    layers = 1 + max(info.layer for n in by_role.values() if (info := node_info(n)).layer is not None)
    converted = next((n for n in gm.graph.nodes if quantize_kind(n) is not None), None)
    if converted is not None:
        raise GraphStructureError("a converted Q/DQ graph: derive the prefill and decode graphs from the graph before "
                                  "conversion (float, or fake-quant under its observers) and convert both", converted.name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ids = by_role["embedding"].args[1]
    if placeholders != [ids]:
        raise GraphStructureError("a decoder graph for the decode rewrite takes one input, the token ids", placeholders[-1].name)
    batch, seq_len = _shape(ids)
    if seq_len < 2:
        raise GraphStructureError(f"sequence length {seq_len}: the decode rewrite needs at least 2 positions", ids.name)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    if len(results) != 1:
        raise GraphStructureError(f"graph returns {len(results)} values; a decoder graph returns the logits only", output.name)

    plain = _propagate(gm, ids, seq_len)
    if plain.axes.get(results[0]) != {1: QUERY} or len(_shape(results[0])) != 3:
        raise GraphStructureError("the output is not logits [batch, tokens, vocab]", results[0].name)
    keys = list(dict.fromkeys(_cached_tensor(plain, k) for k in plain.keys))
    values = list(dict.fromkeys(_cached_tensor(plain, v) for v in plain.values))
    k_by_layer: dict[int, torch.fx.Node] = {}
    v_by_layer: dict[int, torch.fx.Node] = {}
    for found, by_layer, kinds in ((keys, k_by_layer, ("k_norm", "k_proj")), (values, v_by_layer, ("v_proj",))):
        for node in found:
            layer = _layer_of(node, kinds)
            if layer in by_layer:
                raise GraphStructureError(f"layer {layer} has two cached tensors (%{by_layer[layer].name})", node.name)
            by_layer[layer] = node
    for by_layer, what in ((k_by_layer, "key"), (v_by_layer, "value")):
        if sorted(by_layer) != list(range(layers)):
            missing = sorted(set(range(layers)) - set(by_layer))
            raise GraphStructureError(f"no cached {what} found for layer(s) {missing}: attention not recognized there",
                                      by_role.get(f"layers.{missing[0]}.{what[0]}_proj", ids).name if missing else None)
    k_cached = [k_by_layer[i] for i in range(layers)]
    v_cached = [v_by_layer[i] for i in range(layers)]
    prop = _propagate(gm, ids, seq_len, relabel=set(k_cached) | set(v_cached))
    if prop.axes.get(results[0]) != {1: QUERY}:
        raise GraphStructureError("the logits depend on key tokens along a query axis", results[0].name)
    return _Decoder(ids, output, seq_len, batch, layers, k_cached, v_cached, prop, _float_dtype(gm))


# ---- constants: position tables and masks -------------------------------------------------------

def _evaluate(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The value of a constant node (a folded buffer, or constant ops over buffers)."""
    order, stack, seen = [], [(node, False)], set()
    while stack:  # post-order over the constant's ancestors
        current, done = stack.pop()
        if done:
            order.append(current)
            continue
        if current in seen:
            continue
        seen.add(current)
        stack.append((current, True))
        stack.extend((source, False) for source in current.all_input_nodes)
    values: dict[torch.fx.Node, object] = {}
    with torch.no_grad():
        for current in order:
            if current.op == "get_attr":
                values[current] = fetch_attr(gm, current.target)
            elif current.op == "call_module":  # an observer: read through, never run (it may be collecting)
                values[current] = values[current.args[0]]
            else:
                args = torch.fx.node.map_arg(current.args, values.__getitem__)
                kwargs = torch.fx.node.map_arg(current.kwargs, values.__getitem__)
                values[current] = current.target(*args, **kwargs)
    return values[node]


def _mask_value(mask: torch.Tensor, query_axis: int, key_axis: int, node: torch.fx.Node) -> float:
    """The masking value of a causal mask (-inf for a boolean one); anything else is an error."""
    size = mask.shape[query_axis]
    allowed = torch.ones(size, size, dtype=torch.bool).tril()
    moved = mask.movedim((query_axis, key_axis), (-2, -1))
    if mask.dtype == torch.bool:
        if not bool((moved == allowed).all()):
            raise GraphStructureError("attention mask is not causal (a sliding window narrower than the sequence, "
                                      "or another mask, is not supported by the decode rewrite)", node.name)
        return float("-inf")
    attend, masked = moved[..., allowed], moved[..., ~allowed]
    if not bool((attend == 0).all()) or masked.numel() == 0 or not bool((masked == masked.flatten()[0]).all()) \
            or float(masked.flatten()[0]) > -100:
        raise GraphStructureError("attention mask is not causal with one masking value (a sliding window narrower than "
                                  "the sequence, or another mask, is not supported by the decode rewrite)", node.name)
    return float(masked.flatten()[0])


def _classify_constants(gm: torch.fx.GraphModule, decoder: _Decoder) -> tuple[dict, dict, float]:
    """(position tables {node: (axis, value)}, masks {node: (query axis, key axis, value)}, masking value)."""
    tables, masks, mask_values = {}, {}, set()
    for node, axes in decoder.prop.constants.items():
        value = _evaluate(gm, node)
        if KEY in axes.values():
            kinds = sorted(axes.items(), key=lambda item: item[1] != QUERY)
            if [k for _, k in kinds] != [QUERY, KEY]:
                raise GraphStructureError("constant with a key-token axis that is not an attention mask [query, key]", node.name)
            for reader in decoder.prop.mask_readers.get(node, []):
                if reader.target not in (SDPA, aten.add.Tensor):
                    raise GraphStructureError("attention mask read by an op other than an add or scaled_dot_product_attention "
                                              "(the decode mask is additive)", reader.name)
            query_axis, key_axis = kinds[0][0], kinds[1][0]
            mask_values.add(_mask_value(value, query_axis, key_axis, node))
            masks[node] = (query_axis, key_axis, value)
        elif len(axes) == 1:
            tables[node] = (next(iter(axes)), value)
        else:
            raise GraphStructureError("constant with two query-token axes", node.name)
    finite = {v for v in mask_values if math.isfinite(v)}
    if len(finite) > 1:
        raise GraphStructureError(f"attention masks with different masking values {sorted(finite)}", next(iter(masks)).name)
    mask_value = finite.pop() if finite else float("-inf")
    return tables, masks, mask_value


# ---- the rewrite --------------------------------------------------------------------------------

def _resize_args(node: torch.fx.Node, axes: Axes, sizes: dict[str, int]) -> None:
    """Write the new token counts into a reshape's or expand's size list (a -1 stays -1)."""
    shape = list(node.args[1])
    for axis, kind in axes.items():
        if shape[axis] != -1:
            shape[axis] = sizes[kind]
    node.args = (node.args[0], shape) + tuple(node.args[2:])


def _register(module: torch.fx.GraphModule, base: str, value: torch.Tensor) -> str:
    name, index = base, 0
    while hasattr(module, name):
        index += 1
        name = f"{base}_{index}"
    module.register_buffer(name, value.detach().clone().contiguous())
    return name


def _derive(gm: torch.fx.GraphModule, tokens: int | None, cache_slots: int, kind: str) -> CachedGraph:
    decoder = _analyze(gm)
    seq_len, prop = decoder.seq_len, decoder.prop
    tokens = seq_len if tokens is None else tokens
    if tokens < 1 or cache_slots < 0 or cache_slots + tokens > seq_len:
        raise GraphStructureError(f"{kind} of {tokens} token(s) after {cache_slots} cache slot(s) reaches position "
                                  f"{cache_slots + tokens - 1}, beyond the graph's {seq_len} positions (export it "
                                  f"with a longer sequence)", decoder.ids.name)
    if prop.lead is not None:
        if kind == "decode":  # position 0 only ever runs through the prefill: decode without the split
            return _derive(unsplit_leading_tokens(gm), tokens, cache_slots, kind)
        if tokens <= prop.lead:
            raise GraphStructureError(f"prefill of {tokens} token(s) on a graph that splits off {prop.lead} leading "
                                      "token(s): the prefill must be longer", decoder.ids.name)
    tables, masks, mask_value = _classify_constants(gm, decoder)
    sizes = {QUERY: tokens, KEY: cache_slots + tokens}
    if prop.lead is not None:
        sizes.update({LEAD: prop.lead, REST: tokens - prop.lead})

    # a copy of the graph over the same attributes (weights shared, not copied)
    graph = torch.fx.Graph()
    remap: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, remap))
    attributes = {n.target: fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
                  and not str(n.target).startswith("_guards")}
    for node in list(graph.nodes):  # export's input-shape guards: the derived graph has other shapes
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    module = torch.fx.GraphModule(attributes, graph, class_name=f"{kind.capitalize()}Graph")
    axes = {remap[n]: a for n, a in prop.axes.items()}
    ids = remap[decoder.ids]
    k_cached = [remap[n] for n in decoder.k_cached]
    v_cached = [remap[n] for n in decoder.v_cached]
    token_nodes = set(axes)

    def reader(node: torch.fx.Node) -> bool:  # a per-position constant is replaced where tokens read it
        return node in token_nodes or _is_observer(module, node)

    # inputs
    last_input = ids
    def new_input(name: str) -> torch.fx.Node:
        nonlocal last_input
        with graph.inserting_after(last_input):
            last_input = graph.placeholder(name)
        return last_input

    mask_input = positions = None
    k_caches, v_caches = [], []
    if kind == "decode":
        positions = new_input("input_pos")
        mask_source = next(iter(masks), None)
        if mask_source is not None:
            mask_shape = list(_shape(mask_source))
            query_axis, key_axis, _ = masks[mask_source]
            for other, (q_other, k_other, _) in masks.items():
                if _shape(other) != tuple(mask_shape) or (q_other, k_other) != (query_axis, key_axis):
                    raise GraphStructureError("attention masks of different shapes", other.name)
            if (query_axis, key_axis) != (len(mask_shape) - 2, len(mask_shape) - 1):
                raise GraphStructureError("attention mask is not [..., query, key]", mask_source.name)
            mask_shape[query_axis], mask_shape[key_axis] = tokens, cache_slots + tokens
        elif decoder.prop.causal_sdpa:
            mask_shape = [1, 1, tokens, cache_slots + tokens]
        else:
            raise GraphStructureError("no attention mask and no causal attention: cannot tell what a decode step may attend",
                                      decoder.ids.name)
        mask_input = new_input("attention_mask")
        for i, node in enumerate(k_cached):
            k_caches.append(new_input(f"k_cache_{i}"))
        for i, node in enumerate(v_cached):
            v_caches.append(new_input(f"v_cache_{i}"))
    else:
        mask_shape = None

    # constants along the tokens: tables gathered (decode) or cut (prefill); masks an input or cut
    for source, (axis, value) in tables.items():
        node = remap[source]
        if kind == "decode":
            name = _register(module, f"_positions_{source.name}", value)
            with graph.inserting_before(node):
                table = graph.get_attr(name)
                gathered = graph.call_function(aten.index_select.default, (table, axis, positions))
            node.replace_all_uses_with(gathered, delete_user_cb=reader)
        else:
            name = _register(module, f"_prefill_{source.name}", value.narrow(axis, 0, tokens))
            with graph.inserting_before(node):
                cut = graph.get_attr(name)
            node.replace_all_uses_with(cut, delete_user_cb=reader)
    for source, (query_axis, key_axis, value) in masks.items():
        node = remap[source]
        if kind == "decode":
            node.replace_all_uses_with(mask_input, delete_user_cb=reader)
        else:
            name = _register(module, f"_prefill_{source.name}", value.narrow(query_axis, 0, tokens).narrow(key_axis, 0, tokens))
            with graph.inserting_before(node):
                cut = graph.get_attr(name)
            node.replace_all_uses_with(cut, delete_user_cb=reader)
    if kind == "decode":
        for sdpa in decoder.prop.causal_sdpa:  # is_causal=True: the mask input says what to attend
            node = remap[sdpa]
            args = list(node.args) + [None] * (8 - len(node.args))
            dropout = args[4] if args[4] is not None else node.kwargs.get("dropout_p", 0.0)
            scale = args[6] if args[6] is not None else node.kwargs.get("scale")
            gqa = args[7] if args[7] is not None else node.kwargs.get("enable_gqa", False)
            node.args = (*args[:3], mask_input, dropout, False)
            node.kwargs = {"scale": scale, "enable_gqa": gqa}

    # the attention reads the cache and the new tokens
    if kind == "decode":
        for cached, cache in zip(k_cached + v_cached, k_caches + v_caches):
            with graph.inserting_after(cached):
                joined = graph.call_function(aten.cat.default, ([cache, cached], 2))
            cached.replace_all_uses_with(joined, delete_user_cb=lambda user: user is not joined)

    # sizes baked into the ops
    for node, node_axes in axes.items():
        if node.op != "call_function" or not node_axes:
            continue
        if node.target in _RESHAPES or node.target == aten.expand.default:
            _resize_args(node, node_axes, sizes)
        elif node.target == aten.slice.Tensor and node_axes.get(node.args[1] % len(_shape(node)), LEAD) != LEAD:
            node.args = tuple(node.args[:3]) + (_FULL_SLICE_END,) + tuple(node.args[4:])

    # outputs: the logits and the new K/V
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    output.args = ((logits, *k_cached, *v_cached),)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    _drop_unused_attributes(module)

    dtype = decoder.float_dtype
    example = [torch.zeros(decoder.batch, tokens, dtype=tensor_meta(decoder.ids).dtype)]
    k_shapes = tuple(_resized(_shape(n), {2: cache_slots if kind == "decode" else tokens}) for n in decoder.k_cached)
    v_shapes = tuple(_resized(_shape(n), {2: cache_slots if kind == "decode" else tokens}) for n in decoder.v_cached)
    if kind == "decode":
        example += [torch.zeros(tokens, dtype=torch.int64), torch.zeros(mask_shape, dtype=dtype)]
        example += [torch.zeros(s, dtype=dtype) for s in k_shapes + v_shapes]
    _propagate_shapes(module, example, {remap[n]: (n, a) for n, a in prop.axes.items()}, sizes)
    return CachedGraph(
        module=module, kind=kind, tokens=tokens, cache_slots=cache_slots, context=seq_len, layers=decoder.layers,
        k_shapes=k_shapes, v_shapes=v_shapes, mask_shape=None if mask_shape is None else tuple(mask_shape),
        mask_value=mask_value, float_dtype=dtype,
        cached=tuple((k.name, v.name) for k, v in zip(decoder.k_cached, decoder.v_cached)),
    )


def _resized(shape: Sequence[int], changes: dict[int, int]) -> tuple[int, ...]:
    return tuple(changes.get(i, d) for i, d in enumerate(shape))


def _drop_unused_attributes(module: torch.fx.GraphModule) -> None:
    used = {n.target for n in module.graph.nodes if n.op in ("get_attr", "call_module")}
    for name in [n for n, _ in module.named_buffers() if n.startswith(("_prefill_", "_positions_")) and n not in used]:
        delattr(module, name)


def _propagate_shapes(module: torch.fx.GraphModule, example: list[torch.Tensor],
                      sources: dict[torch.fx.Node, tuple[torch.fx.Node, Axes]], sizes: dict[str, int]) -> None:
    """Recompute every node's `val` with fake tensors; each token-carrying node must be its source
    shape with the token axes resized (else the rewrite missed a size baked into the graph)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class _Shapes(FakeTensorProp):
        def call_module(self, target, args, kwargs):  # an observer would record fake statistics
            if _observer_module(self.fetch_attr(target)):
                return args[0]
            return super().call_module(target, args, kwargs)

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = [mode.from_tensor(t) for t in example]
    try:
        _Shapes(module, mode).propagate(*fake)
    except Exception as error:  # the op that cannot take its new shapes: name it
        failing = next((n for n in module.graph.nodes if n.op == "call_function" and "val" not in n.meta), None)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GraphStructureError(f"the resized graph does not run ({message}): a size the decode rewrite did not "
                                  "follow is baked in here", failing.name if failing is not None else None) from None
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    for node in module.graph.nodes:  # export's `tensor_meta` too, so that no stale shape is left behind
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)
        else:
            node.meta.pop("tensor_meta", None)
    for node in module.graph.nodes:
        if node not in sources or node.op == "placeholder":
            continue
        source, axes = sources[node]
        expected = _resized(_shape(source), {axis: sizes[kind] for axis, kind in axes.items()})
        if tuple(_shape(node)) != expected:
            raise GraphStructureError(f"resized to {list(_shape(node))}, expected {list(expected)}: a size the decode "
                                      "rewrite did not follow is baked in here", node.name)


def leading_tokens(gm: torch.fx.GraphModule) -> int:
    """How many leading positions SplitLeadingTokens gave their own MLP copies in `gm` (0: none)."""
    return _analyze(gm).prop.lead or 0


def unsplit_leading_tokens(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` without SplitLeadingTokens' split, as a copy over the same attributes: each split MLP's
    rest copy reads every token (the slice `x[:, k:]` becomes the one-piece `cat([x])`, keeping its
    node and encoding), the leading copy is gone, and the join
    `cat([lead, rest])` becomes the one-piece `cat([rest])`, keeping its node (so its encoding,
    and the edges into it, stay the ones stage two gave it). In float it is the same function; under
    the observers it is the split graph's function at every position >= k (the rest's encodings),
    which is what a decode step computes. A graph without the split is returned as it is."""
    decoder = _analyze(gm)
    prop = decoder.prop
    if prop.lead is None:
        return gm
    graph = torch.fx.Graph()
    remap: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, remap))
    attributes = {n.target: fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    module = torch.fx.GraphModule(attributes, graph, class_name=type(gm).__name__)
    for source, axes in prop.axes.items():
        node = remap[source]
        if source.target == aten.slice.Tensor and REST in axes.values() and prop.of(source.args[0]) is not None \
                and REST not in prop.of(source.args[0]).values():
            # the rest reads every token: the slice becomes the one-piece cat([x]) over its axis,
            # keeping its node, so its own encoding (stage two calibrated it on positions >= k, apart
            # from the whole's) and the edges out of it stay what the rest copy reads in the prefill
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            node.target, node.args, node.kwargs = aten.cat.default, ([node.args[0]], dim), {}
    from quantnpu.graph.meta import tensor_quant, update_tensor_quant

    for join in prop.splits:
        node = remap[join]
        head = node.args[0][0]
        while _is_observer(module, head):
            head = head.args[0]
        node.args = ([node.args[0][1]], *node.args[1:])
        record = tensor_quant(node)
        if record is not None:  # the join no longer reads the leading copy: its edge goes with it
            update_tensor_quant(node, input_bits=tuple((n, b) for n, b in record.input_bits if n != head.name),
                                input_encodings=tuple((n, e) for n, e in record.input_encodings if n != head.name))
    changed = True
    while changed:  # the leading copy, now unread (observers included, which DCE keeps)
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("call_function", "call_module", "get_attr") and not node.users:
                graph.erase_node(node)
                changed = True
    graph.lint()
    module.recompile()
    used = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    for name in [n for n in attributes if n not in used and "." not in n]:
        delattr(module, name)
    return module


def derive_prefill(gm: torch.fx.GraphModule, tokens: int | None = None) -> CachedGraph:
    """The prefill graph of `tokens` (default: the source's sequence length) tokens from position 0,
    returning the logits and every layer's K and V (see the module docstring)."""
    return _derive(gm, tokens, 0, "prefill")


def derive_decode(gm: torch.fx.GraphModule, cache_slots: int, tokens: int = 1) -> CachedGraph:
    """The decode graph: `tokens` new tokens at positions `input_pos` attending to `cache_slots`
    cache slots and to each other (see the module docstring)."""
    return _derive(gm, tokens, cache_slots, "decode")


# ---- a reference loop -------------------------------------------------------------------------

class KvCacheRunner:
    """Prefill then decode steps in Python around the two derived graphs: the cache bookkeeping a
    runtime does (write the new K/V at slot = position, mask the slots not yet written), in the
    graphs' float dtype. The reference the tests and the generator check against."""

    def __init__(self, prefill: CachedGraph, decode: CachedGraph) -> None:
        if prefill.kind != "prefill" or decode.kind != "decode":
            raise ValueError("KvCacheRunner takes a prefill graph and a decode graph")
        self.prefill_graph, self.decode_graph = prefill, decode
        dtype = decode.float_dtype
        self.k = [torch.zeros(s, dtype=dtype) for s in decode.k_shapes]
        self.v = [torch.zeros(s, dtype=dtype) for s in decode.v_shapes]
        self.length = 0
        self.prefill_tokens, self.cache_slots, self.decode_tokens = prefill.tokens, decode.cache_slots, decode.tokens
        self.leading_tokens = 0  # the graphs' own check: a split prefill is longer than its leading tokens

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt `ids [B, t]` (t <= P) from position 0, padded on the right; returns the
        logits of the t real tokens and leaves slots 0..t-1 written."""
        tokens = ids.shape[1]
        if not 0 < tokens <= self.prefill_graph.tokens:
            raise ValueError(f"prompt of {tokens} tokens; the prefill graph takes 1..{self.prefill_graph.tokens}")
        if tokens > self.decode_graph.cache_slots:
            raise ValueError(f"prompt of {tokens} tokens; the decode cache has {self.decode_graph.cache_slots} slots")
        padded = torch.zeros(ids.shape[0], self.prefill_graph.tokens, dtype=ids.dtype)
        padded[:, :tokens] = ids
        outputs = self.prefill_graph(padded)
        layers = self.prefill_graph.layers
        for cache, new in zip(self.k + self.v, outputs[1:1 + 2 * layers]):
            cache.zero_()
            cache[:, :, :tokens] = new[:, :, :tokens]  # the padding's K/V are never written
        self.length = tokens
        return outputs[0][:, :tokens]

    def mask(self) -> torch.Tensor:
        """The decode mask at the current length: written slots and the new tokens (causally) attend."""
        graph = self.decode_graph
        slots, tokens = graph.cache_slots, graph.tokens
        allowed = torch.zeros(tokens, slots + tokens, dtype=torch.bool)
        allowed[:, :min(self.length, slots)] = True
        allowed[:, slots:] = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        mask = torch.full(allowed.shape, graph.mask_value, dtype=graph.float_dtype).masked_fill(allowed, 0.0)
        return mask.reshape([1] * (len(graph.mask_shape) - 2) + list(allowed.shape)).expand(graph.mask_shape).contiguous()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run `ids [B, T]` at the next T positions; returns their logits and writes their K/V."""
        graph = self.decode_graph
        if self.length > graph.cache_slots:
            raise ValueError(f"cache full: the {graph.cache_slots} slots are written")
        positions = torch.arange(self.length, self.length + graph.tokens)
        outputs = graph(ids, positions, self.mask(), *self.k, *self.v)
        kept = positions < graph.cache_slots  # a step into a full cache still attends to it; its K/V have no slot
        for cache, new in zip(self.k + self.v, outputs[1:1 + 2 * graph.layers]):
            cache[:, :, positions[kept]] = new[:, :, kept]
        self.length += graph.tokens
        return outputs[0]
