"""One pipeline run, one set of encodings: the prefill and decode graphs of a quantized decoder as Q/DQ graphs.

`convert_cached(fake_quant, P, C)` takes the pipeline's fake-quant graph (after StaticCalibration /
RoundWeightsGptq, before ConvertToQdq: `pipeline.fake_quant_end`), derives the prefill and decode
graphs from it (`quantnpu.graph.decode`: node names kept, weights and observer modules shared), and
converts both with `QuantNpuQuantizer`, which reads every encoding from the node it quantizes. So
a tensor of either graph is quantized with the encoding stage two gave the full-sequence tensor of
the same name; the decode graph is never calibrated. What the derivation made new gets its
encoding explicitly, from the tensor it stands for:

- position tables gathered by `input_pos` (decode) or cut to P rows (prefill), and the decode
  mask input: the encoding of the source table or mask they replace (their observer stayed on them);
- the cache. The cached K and V (per layer, `[B, kv_heads, tokens, head_dim]`, before the
  grouped-query repeat) cross the graph boundary as integers at ONE encoding, the *cache
  encoding*, which is the narrowest encoding at which the attention reads that tensor in the
  full-sequence graph. For V that is the V tensor's own (`layers.N.value`, KV bits). For K it is
  not the tensor's: the RoPE output is a 16-bit tensor (an HTP op writes the width it reads, and
  RoPE reads 16-bit products), and the op making `layers.N.key` (the sqrt(scale) product after the
  repeat, PrepareForQnn's split of the attention scale) re-quantizes it to KV bits on its input
  edge. The derived graphs move that re-quantization up to the cache point: a one-piece
  `cat([k])` (QNN's Concat) writes K at the edge's KV-bit encoding, and the repeat, the transpose
  and the key op read that. Because a per-tensor re-quantization commutes with the repeat and the
  transpose, this is exactly the full-sequence graph's function (q_kv(q16(k)) on the same values),
  with the cache at the plan's KV bits and no change to the pipeline, its calibration or its
  full-sequence graph. Every other reader of the cached tensor must read it at the cache encoding
  or at a lossless widening of it (16 bits holding the 8-bit grid), else an error naming it.
  The decode graph's cache inputs and its concatenation `cat([cache, new])` carry the cache
  encoding too, so the K/V a graph writes are read back by the next step as the same integers.

Checked, not assumed: after the quantizer has annotated both graphs, every quantized tensor
(activations, weights and re-quantizing edges) of each graph must carry an encoding the
full-sequence fake-quant graph holds for the tensor of that name (or the cache encoding on the
cache path), and the prefill and decode graphs must quantize the same tensors with the same
encodings, except what runs only for the leading tokens (below). A tensor of one graph with no
counterpart in the other, or with another encoding, is a `GraphStructureError` naming it.

The leading-token split (SplitLeadingTokens): the prefill, which starts at position 0, keeps it
(the first k positions run through the MLP copies with their own encodings); the decode graph is
derived from the graph without it (`unsplit_leading_tokens`: the rest copy reads every token), so
every position >= k uses the rest's encodings, the ones stage two calibrated on positions >= k.
The rest slice and the join keep their nodes (one-piece `cat`s), so the rest copy's input (which
stage two gives an encoding of its own, calibrated on positions >= k) and the residual stream
after the MLP have the same encodings in both graphs; what the leading copies alone read (their
own 16-bit edges from a shared tensor) is compared apart. A prompt must therefore cover the k leading positions (k = 1 by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.graph.decode import (
    CachedGraph, _analyze, _classify_constants, _is_observer, derive_decode, derive_prefill, unsplit_leading_tokens,
)
from quantnpu.graph.meta import TensorQuant, tensor_quant, update_tensor_quant
from quantnpu.quantizers.encodings import Encoding, EncodingTable

aten = torch.ops.aten
CACHE_AXIS = 2  # [B, kv_heads, tokens, head_dim]
# Ops between the cached tensor and the op reading it in the attention that share its encoding
# (QNN's annotation gives them their input's), through which the cache encoding reaches the reader.
_SHARED_MOVES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.expand.default, aten.transpose.int, aten.permute.default, aten.squeeze.dim, aten.clone.default,
    aten.contiguous.default,
}


@dataclass
class QdqCachedPair:
    """The two Q/DQ graphs of one quantized decoder and what a runtime needs to drive them.

    `prefill` / `decode`: the derived graphs (`CachedGraph`, their `module` converted to Q/DQ);
    `k_encodings` / `v_encodings`: each layer's cache encoding (the K/V outputs of both graphs and
    the decode graph's cache inputs); `mask_encoding`: the decode mask input's; `logits_encoding`:
    the logits'; `leading_tokens`: positions that only the prefill computes (SplitLeadingTokens);
    `encodings`: every encoding of both graphs by tensor name (the encodings JSON's content)."""

    prefill: CachedGraph
    decode: CachedGraph
    k_encodings: tuple[Encoding, ...]
    v_encodings: tuple[Encoding, ...]
    mask_encoding: Encoding | None
    logits_encoding: Encoding
    leading_tokens: int
    encodings: EncodingTable
    checked: dict[str, int] = field(default_factory=dict)  # quantized tensors compared, per graph


# ---- encodings of the new nodes ---------------------------------------------------------------

def _record(node: torch.fx.Node) -> TensorQuant | None:
    record = tensor_quant(node)
    return record if record is not None and isinstance(record.encoding, Encoding) else None


def _settle_under_observers(module: torch.fx.GraphModule, source_names: set[str]) -> None:
    """A tensor the derivation put under an existing observer (a gathered or cut table, the mask
    input: a node the source graph does not have) takes that observer's encoding; a gathered
    table's full table too (the gather reads it at the same encoding: it picks rows). A node of the
    source keeps what the source recorded (nothing, if nothing: the quantizer then names it)."""
    for node in module.graph.nodes:
        if not _is_observer(module, node):
            continue
        encoding = getattr(module.get_submodule(node.target), "encoding", None)
        source = node.args[0]
        if not isinstance(encoding, Encoding) or _is_observer(module, source) or _record(source) is not None \
                or source.name in source_names:
            continue
        for tensor in (source, source.args[0]) if source.target == aten.index_select.default else (source,):
            update_tensor_quant(tensor, encoding=encoding, bits=encoding.bits)


def _is_widening(wide: Encoding, narrow: Encoding) -> bool:
    """`wide` holds every value of `narrow`'s grid (the same grid in more bits, or itself)."""
    if wide == narrow:
        return True
    if wide.bits <= narrow.bits or wide.zero_point != narrow.zero_point or wide.axis != narrow.axis \
            or len(wide.scale) != len(narrow.scale):
        return False
    shift = 2 ** (wide.bits - narrow.bits)
    return all(w * shift == n for w, n in zip(wide.scale, narrow.scale))


@dataclass
class _CachePoint:
    layer: int
    what: str                    # "k" or "v"
    observer: torch.fx.Node      # the cached tensor (its observer's output)
    tensor: torch.fx.Node        # what the observer reads
    encoding: Encoding           # the cache encoding
    path: list[torch.fx.Node]    # the shared-encoding moves between the cache and its readers


def _cache_point(module: torch.fx.GraphModule, name: str, layer: int, what: str) -> _CachePoint:
    """The cache encoding of one cached tensor: the narrowest encoding among the tensor's own and
    the edges by which the attention reads it; every other reading must be a lossless widening."""
    nodes = {n.name: n for n in module.graph.nodes}
    observer = nodes[name]
    if not _is_observer(module, observer):
        raise GraphStructureError("the cached tensor is not observed: derive from the fake-quant graph (after "
                                  "StaticCalibration) to convert the prefill and decode graphs", name)
    tensor = observer.args[0]
    own = _record(tensor)
    if own is None:
        raise GraphStructureError("the cached tensor has no encoding: run StaticCalibration first", tensor.name)
    readings: list[tuple[Encoding, torch.fx.Node]] = []  # (encoding, reader): what the attention reads
    path: list[torch.fx.Node] = []
    frontier, seen = [observer], set()
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            if _is_observer(module, user):
                frontier.append(user)
            elif user.op == "call_function" and (user.target in _SHARED_MOVES or (
                    user.target == aten.cat.default and user.args[1] in (CACHE_AXIS, CACHE_AXIS - 4))):
                path.append(user)  # the grouped-query repeat, transposes; the decode graph's cat(cache, new)
                frontier.append(user)
            else:  # a reader: at its edge's encoding, if it re-quantizes, else at the tensor's
                record = tensor_quant(user)
                read = current
                while _is_observer(module, read):
                    read = read.args[0]
                edge = record.input_encoding(read.name) if record is not None else None
                readings.append((edge if isinstance(edge, Encoding) else own.encoding, user))
    # the tensor's own encoding counts when it is the narrowest (V: 8 bits, read widened to 16 by P @ V)
    encoding = min([own.encoding] + [e for e, _ in readings], key=lambda e: e.bits)
    for other, reader in readings:
        if not _is_widening(other, encoding):
            raise GraphStructureError(f"reads the cached {what.upper()} of layer {layer} at {other.describe()}, which is "
                                      f"not the cache encoding ({encoding.describe()}) or a lossless widening of it",
                                      reader.name)
    return _CachePoint(layer, what, observer, tensor, encoding, path)


def _set_cache_encodings(cached: CachedGraph) -> list[_CachePoint]:
    """Give the cache path its encoding: a one-piece cat writing the cache encoding where the tensor
    has another one (K), the moves and the decode graph's cache inputs and concatenations the same,
    and the readers' edges that are now no re-quantization dropped."""
    module, graph = cached.module, cached.module.graph
    points = []
    for layer, (k_name, v_name) in enumerate(cached.cached):
        for what, name in (("k", k_name), ("v", v_name)):
            point = _cache_point(module, name, layer, what)
            encoding = point.encoding
            record = _record(point.tensor)
            label = f"layers.{layer}.{'key' if what == 'k' else 'value'}_cache"
            if record.encoding != encoding:  # re-quantize at the cache point (K: 16-bit RoPE output -> KV bits)
                with graph.inserting_after(point.observer):
                    written = graph.call_function(aten.cat.default, ([point.observer], CACHE_AXIS))
                written.name = f"{what}_cached_{layer}"
                written.meta["val"] = point.observer.meta.get("val", point.tensor.meta.get("val"))
                if "tensor_meta" in point.tensor.meta:
                    written.meta["tensor_meta"] = point.tensor.meta["tensor_meta"]
                point.observer.replace_all_uses_with(written, delete_user_cb=lambda user: user is not written)
                update_tensor_quant(written, encoding=encoding, bits=encoding.bits, labels=(label,),
                                    input_encodings=((point.tensor.name, encoding),),
                                    input_bits=((point.tensor.name, encoding.bits),))
                point.path.insert(0, written)
            for node in point.path:
                update_tensor_quant(node, encoding=encoding, bits=encoding.bits)
                if node.target == aten.cat.default:
                    for piece in node.args[0]:
                        if piece.op == "placeholder":  # the decode graph's cache input
                            update_tensor_quant(piece, encoding=encoding, bits=encoding.bits, labels=(label,))
            for node in point.path:  # readers of the path: an edge at the cache encoding re-quantizes nothing
                for user in node.users:
                    record = tensor_quant(user)
                    if record is None or not record.input_encodings or user in point.path:
                        continue
                    kept = tuple((n, e) for n, e in record.input_encodings if not (n == node.name and e == encoding))
                    if kept != record.input_encodings:
                        update_tensor_quant(user, input_encodings=kept,
                                            input_bits=tuple((n, b) for n, b in record.input_bits if n in dict(kept)))
            points.append(point)
    graph.lint()
    module.recompile()
    return points


# ---- what the quantizer quantized ------------------------------------------------------------

def _quantized(prepared: torch.fx.GraphModule, leading_only: set[str] = frozenset()) -> tuple[dict[str, set[Encoding]], dict[str, set[Encoding]]]:
    """Every tensor the quantizer put an observer on, by name (parameters by their attribute
    name), with the encodings it is quantized at (its own and its re-quantizing edges'): those
    read by any node the decode graph also has, and apart, those read only by `leading_only` nodes
    (the leading-token copies' own edges, e.g. a copy's 16-bit input re-quantizing a shared norm)."""
    from quantnpu.quantizers.observers import EncodingObserver

    found: dict[str, set[Encoding]] = {}
    leading: dict[str, set[Encoding]] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        observer = prepared.get_submodule(node.target)
        if not isinstance(observer, EncodingObserver):
            continue
        tensor = node.args[0]
        while tensor.op == "call_module":
            tensor = tensor.args[0]
        name = str(tensor.target) if tensor.op == "get_attr" else tensor.name
        readers = {user.name for user in node.users}
        kept = leading if readers and readers <= leading_only else found
        kept.setdefault(name, set()).add(observer.encoding)
    return found, leading


def _source_encodings(fake_quant: torch.fx.GraphModule, masks: set[str]) -> dict[str, set[Encoding]]:
    """What the full-sequence fake-quant graph quantizes each tensor at: by node name (and a
    parameter by its attribute name too), the masks' under `attention_mask`."""
    allowed: dict[str, set[Encoding]] = {}
    for node in fake_quant.graph.nodes:
        record = tensor_quant(node)
        if record is None or node.op == "call_module":
            continue
        names = [node.name] + ([str(node.target)] if node.op == "get_attr" else [])
        names += ["attention_mask"] if node.name in masks else []
        for name in names:
            if isinstance(record.encoding, Encoding):
                allowed.setdefault(name, set()).add(record.encoding)
        for name, encoding in record.input_encodings:
            allowed.setdefault(name, set()).add(encoding)
            if name in masks:
                allowed.setdefault("attention_mask", set()).add(encoding)
    return allowed


def _canonical(cached: CachedGraph, points: list[_CachePoint], masks: set[str]) -> dict[str, str]:
    """Names of the derived graph's new tensors -> the tensor each stands for: a cut or gathered
    table -> the source table (by node name), the decode mask input -> `attention_mask`, the cache
    inputs and concatenations -> `k_cache_<layer>` / `v_cache_<layer>`."""
    names: dict[str, str] = {}
    for node in cached.module.graph.nodes:
        target = str(node.target)
        if node.op == "get_attr" and target.startswith(("_prefill_", "_positions_")):
            names[target] = target.split("_", 2)[2]
            if names[target] in masks:
                names[target] = "attention_mask"
            for user in node.users:
                if user.target == aten.index_select.default:
                    names[user.name] = names[target]
    for point in points:  # the decode graph's cache input and cat(cache, new) hold the cached tensor
        for node in point.path:
            pieces = node.args[0] if node.target == aten.cat.default else []
            if any(piece.op == "placeholder" for piece in pieces):
                names[node.name] = point.tensor.name
                names.update({piece.name: point.tensor.name for piece in pieces if piece.op == "placeholder"})
    return names


def _edges_name_their_inputs(gm: torch.fx.GraphModule, canonical: dict[str, str]) -> None:
    """Every re-quantizing edge recorded on a node must name one of the node's inputs (the quantizer
    finds it by name; a stale name would silently quantize the edge at the input's own encoding). An
    input the derivation made new (a gathered table, the mask input) takes the edge of the tensor it
    stands for; any other stale name is an error naming the node."""
    for node in gm.graph.nodes:
        record = tensor_quant(node)
        if record is None or not record.input_encodings:
            continue
        inputs = {n.name for n in node.all_input_nodes}
        renames = {}
        for name, _ in record.input_encodings:
            if name in inputs:
                continue
            standing = [i for i in inputs if canonical.get(i) == name]
            if len(standing) != 1:
                raise GraphStructureError(f"re-quantizing edge recorded from %{name}, which this node no longer reads: "
                                          "its encoding would be lost", node.name)
            renames[name] = standing[0]
        if renames:
            update_tensor_quant(node, input_encodings=tuple((renames.get(n, n), e) for n, e in record.input_encodings),
                                input_bits=tuple((renames.get(n, n), b) for n, b in record.input_bits))


def _convert(cached: CachedGraph, soc: str, canonical: dict[str, str], leading_only: set[str]
             ) -> tuple[torch.fx.GraphModule, dict[str, set[Encoding]], dict[str, set[Encoding]]]:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from quantnpu.passes.weights import drop_unused_tensors
    from quantnpu.quantizers.quantnpu_quantizer import QuantNpuQuantizer, strip_observers

    float_graph = strip_observers(cached.module, in_place=True)  # the derived module: the source keeps its observers
    _edges_name_their_inputs(float_graph, canonical)
    prepared = prepare_pt2e(float_graph, QuantNpuQuantizer(soc))
    quantized, leading = _quantized(prepared, leading_only)
    converted = convert_pt2e(prepared)
    drop_unused_tensors(converted)
    return converted, quantized, leading


def _compare(prefill: dict[str, set[Encoding]], decode: dict[str, set[Encoding]], leading_only: set[str],
             prefill_leading: dict[str, set[Encoding]] | None = None) -> None:
    """The two graphs quantize the same tensors at the same encodings, but for what only the
    prefill's leading-token copies compute or read (`leading_only` nodes; `prefill_leading`: the
    encodings the prefill gives a tensor only on edges into them)."""
    prefill_leading = prefill_leading or {}
    for name in prefill:
        if name not in decode and name not in leading_only:
            raise GraphStructureError("quantized in the prefill graph but has no counterpart in the decode graph", name)
    for name in decode:
        if name not in prefill and name not in prefill_leading:
            raise GraphStructureError("quantized in the decode graph but has no counterpart in the prefill graph", name)
        if name in leading_only:
            continue
        if prefill.get(name, set()) != decode[name]:
            def shown(encodings):
                return sorted(f"{e.describe()} scale {e.scale[0]:.6g}" for e in encodings)
            raise GraphStructureError(f"quantized at {shown(prefill.get(name, set()))} in the prefill graph "
                                      f"and at {shown(decode[name])} in the decode graph", name)


def _check_against_source(kind: str, quantized: dict[str, set[Encoding]], canonical: dict[str, str],
                          allowed: dict[str, set[Encoding]], cache: dict[str, Encoding]) -> dict[str, set[Encoding]]:
    """Every encoding of a derived graph is one the source holds for that tensor (or the cache
    encoding on the cache path); returns the encodings by canonical name."""
    by_name: dict[str, set[Encoding]] = {}
    for name, encodings in quantized.items():
        source = canonical.get(name, name)
        expected = set(allowed.get(source, set())) | set(allowed.get(name, set()))
        if source in cache:
            expected.add(cache[source])
        if name in cache:
            expected.add(cache[name])
        if not expected:
            raise GraphStructureError(f"quantized in the {kind} graph, but the fake-quant graph has no encoding for it "
                                      "(no counterpart)", name)
        stray = [e for e in encodings if e not in expected]
        if stray:
            raise GraphStructureError(f"quantized at {stray[0].describe()} (scale {stray[0].scale[0]:.6g}) in the {kind} "
                                      "graph: not an encoding the fake-quant graph gives this tensor", name)
        by_name.setdefault(source, set()).update(encodings)
    return by_name


def _merged_table(graphs: Iterable[torch.fx.GraphModule]) -> EncodingTable:
    from quantnpu.passes.static_calibration import encodings_by_tensor

    activations, params, edges = {}, {}, {}
    for gm in graphs:
        table = encodings_by_tensor(gm)
        for target, source in ((activations, table.activations), (params, table.params), (edges, table.edges)):
            for name, value in source.items():
                if name in target and target[name] != value:
                    raise GraphStructureError("two encodings for one tensor name in the prefill and decode graphs", name)
                target[name] = value
    return EncodingTable(activations, params, edges)


def convert_cached(fake_quant: torch.fx.GraphModule, prefill_tokens: int, cache_slots: int, decode_tokens: int = 1,
                   soc: str = "SM8650") -> QdqCachedPair:
    """The prefill (`prefill_tokens` from position 0) and decode (`decode_tokens` after
    `cache_slots` cache slots) Q/DQ graphs of a fake-quant decoder graph, with one set of
    encodings (see the module docstring). `fake_quant` is left as it was."""
    source = _analyze(fake_quant)
    lead = source.prop.lead or 0
    source_names = {n.name for n in fake_quant.graph.nodes}
    unsplit = unsplit_leading_tokens(fake_quant) if lead else fake_quant
    # what only the prefill computes: the leading copies and the split itself
    leading_only = source_names - {n.name for n in unsplit.graph.nodes}
    _, masks, _ = _classify_constants(fake_quant, source)
    allowed = _source_encodings(fake_quant, {n.name for n in masks})

    prefill = derive_prefill(fake_quant, prefill_tokens)
    decode = derive_decode(unsplit, cache_slots, decode_tokens)
    results = {}
    for cached in (prefill, decode):
        _settle_under_observers(cached.module, source_names)
        points = _set_cache_encodings(cached)
        table = _merged_table([cached.module])
        canonical = _canonical(cached, points, {n.name for n in masks})
        cache = {node.name: p.encoding for p in points for node in [p.tensor, *p.path]}
        converted, quantized, leading = _convert(cached, soc, canonical, leading_only if cached.kind == "prefill" else set())
        by_name = _check_against_source(cached.kind, quantized, canonical, allowed, cache)
        leading_by_name = _check_against_source(cached.kind, leading, canonical, allowed, cache)
        results[cached.kind] = (converted, by_name, points, table, leading_by_name)
    _compare(results["prefill"][1], results["decode"][1], leading_only, results["prefill"][4])

    points = results["decode"][2]
    prefill_points = results["prefill"][2]
    for p, d in zip(prefill_points, points):
        if p.encoding != d.encoding:  # the same tensor's encoding in both: cannot differ, but it is the contract
            raise GraphStructureError(f"layer {p.layer}: the prefill writes {p.what.upper()} at {p.encoding.describe()}, "
                                      f"the decode graph reads {d.encoding.describe()}", d.observer.name)
    logits = source.output.args[0]
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    logits_record = _record(logits) or (_record(logits.args[0]) if logits.op == "call_module" else None)
    if logits_record is None:
        raise GraphStructureError("the logits have no encoding", logits.name)
    mask_encoding = None
    decode_module = results["decode"][0]
    mask_placeholder = next((n for n in decode_module.graph.nodes if n.op == "placeholder" and n.name == "attention_mask"), None)
    if mask_placeholder is not None:
        mask_encoding = next(iter(results["decode"][1].get("attention_mask", {None})))
    merged = {"activations": {}, "params": {}, "edges": {}}
    for _, _, _, t, _ in results.values():
        flat_edges = {(reader, name): e for reader, inputs in t.edges.items() for name, e in inputs.items()}
        for key, part in (("activations", t.activations), ("params", t.params), ("edges", flat_edges)):
            for name, value in part.items():
                if name in merged[key] and merged[key][name] != value:
                    raise GraphStructureError("two encodings for one tensor name in the prefill and decode graphs",
                                              name if isinstance(name, str) else name[0])
                merged[key][name] = value
    edges: dict[str, dict[str, Encoding]] = {}
    for (reader, name), encoding in merged["edges"].items():
        edges.setdefault(reader, {})[name] = encoding
    merged["edges"] = edges
    table = EncodingTable(merged["activations"], merged["params"], merged["edges"])
    return QdqCachedPair(
        prefill=dataclasses.replace(prefill, module=results["prefill"][0]),
        decode=dataclasses.replace(decode, module=decode_module),
        k_encodings=tuple(p.encoding for p in points if p.what == "k"),
        v_encodings=tuple(p.encoding for p in points if p.what == "v"),
        mask_encoding=mask_encoding, logits_encoding=logits_record.encoding, leading_tokens=lead, encodings=table,
        checked={kind: len(r[1]) + len(r[4]) for kind, r in results.items()},
    )
