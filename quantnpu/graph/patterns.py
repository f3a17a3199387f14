"""Structural patterns recognised in decoder graphs, shared by the passes and the quantizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from quantnpu.diagnostics import warn
from quantnpu.errors import GraphStructureError
from quantnpu.graph.ops import (
    CASTS, LAYER_NORM, RSQRT, compute_nodes, data_users, fetch_attr, insert_call, is_weight, tensor_meta,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class RmsNorm:
    input: torch.fx.Node        # x
    normalized: torch.fx.Node   # x * rsqrt(mean(x * x) + eps)
    output: torch.fx.Node       # the weight multiply, else `normalized` (after casts)
    weight: torch.fx.Node | None
    eps: object                 # the number added to the mean square


def _is_square_of(node: object, x: torch.fx.Node) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target == aten.mul.Tensor:
        return node.args[0] is x and node.args[1] is x
    return node.target in (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor) and node.args[0] is x and node.args[1] in (2, 2.0)


def _norm_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, normalized: torch.fx.Node) -> torch.fx.Node | None:
    if node.target != aten.mul.Tensor:
        return None
    for a, b in (node.args, node.args[::-1]):
        if b is normalized and is_weight(a) and isinstance(value := fetch_attr(gm, a.target), torch.Tensor) and value.dim() == 1:
            return a
    return None


def rms_norms(gm: torch.fx.GraphModule) -> list[RmsNorm]:
    """Every RMSNorm in graph order; an rsqrt that is not one is an error naming it."""
    norms = []
    for node in compute_nodes(gm):
        if node.target in LAYER_NORM:
            raise GraphStructureError("LayerNorm (mean-subtracted, with bias) is not supported: only RMSNorm decoders are", node.name)
        if node.target != RSQRT:
            continue
        products = [u for u in data_users(node) if u.target == aten.mul.Tensor]
        variance = node.args[0]
        mean = variance.args[0] if isinstance(variance, torch.fx.Node) and variance.target == aten.add.Tensor else None
        if len(products) != 1 or not isinstance(mean, torch.fx.Node) or mean.target != aten.mean.dim:
            raise GraphStructureError("rsqrt is not the x * rsqrt(mean(x * x) + eps) of an RMSNorm", node.name)
        normalized = products[0]
        x = normalized.args[0] if normalized.args[1] is node else normalized.args[1]
        if not _is_square_of(mean.args[0], x):
            raise GraphStructureError("normalization is not an RMSNorm (x * rsqrt(mean(x * x) + eps)); "
                                      "mean-subtracted norms are not supported", node.name)
        rank = x.meta["val"].dim() if isinstance(x.meta.get("val"), torch.Tensor) else None
        dims = [d % rank for d in mean.args[1]] if rank is not None and len(mean.args) > 1 else None
        keepdim = (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
        if dims != [rank - 1] or not keepdim or isinstance(variance.args[1], torch.fx.Node):
            raise GraphStructureError("RMSNorm over other than the last dimension (or with a computed eps) is not supported",
                                      node.name)
        output, weight = normalized, None
        while True:
            users = data_users(output)
            if len(users) != 1:
                break
            user = users[0]
            if user.target in CASTS and user.args[0] is output:
                output = user
            elif (found := _norm_weight(gm, user, output)) is not None:
                output, weight = user, found
                break
            else:
                break
        norms.append(RmsNorm(x, normalized, output, weight, variance.args[1]))
    return norms


def _casts_between(norm: RmsNorm) -> list[torch.fx.Node]:
    """The casts the weight multiply reads the normalized tensor through (none: it reads it directly)."""
    operand = norm.output.args[1] if norm.output.args[0] is norm.weight else norm.output.args[0]
    casts = []
    while operand is not norm.normalized:
        casts.append(operand)
        operand = operand.args[0]
    return casts


def _is_identity_cast(node: torch.fx.Node) -> bool:
    source, result = tensor_meta(node.args[0]), tensor_meta(node)
    return source is not None and result is not None and source.dtype == result.dtype and source.device == result.device


def recompose_rms_norms(gm: torch.fx.GraphModule) -> int:
    """Each RMSNorm becomes one `aten.rms_norm(x, [d], weight, eps)` (weight None once FoldNorms
    moved it into the next linears): QNN quantizes and runs it as one op, in its own internal
    precision. Op by op, x * x, its mean and rsqrt would be 16-bit tensors whose per-tensor scale
    is set by the largest token: SmolLM2-135M's first token reaches ~1600 in the residual stream
    (x * x ~2.5e6, a 16-bit step of ~76), so every other token's mean square rounded to zero and its
    norm was wrong by up to 1.5x from layer 11 on.

    A weight multiply that reads the normalized tensor directly, or through casts that change
    nothing (same dtype), is fused too. One that reads it through a real cast (a half-precision
    model's `.to(input_dtype)` before `weight *`) cannot be: `rms_norm` would compute the weighted
    product in the normalization's dtype, a different function. Then only the normalization becomes
    `rms_norm(x, [d], None, eps)` and the cast and weight multiply stay separate ops, with a
    `QuantNpuWarning` naming them (the cost: one more quantized tensor, the unit-RMS normalized
    one, and one more op on the NPU; the mean square is never quantized on its own). So after this
    no rsqrt of an RMSNorm is left. Returns how many norms were recomposed."""
    recomposed = 0
    for norm in rms_norms(gm):
        casts = _casts_between(norm) if norm.weight is not None else []
        if norm.weight is None:
            replaced, weight = norm.normalized, None
        elif all(_is_identity_cast(c) for c in casts):
            replaced, weight = norm.output, norm.weight
        else:
            replaced, weight = norm.normalized, None
            warn(f"RMSNorm %{norm.normalized.name}: its weight multiply %{norm.output.name} reads the normalized tensor through "
                 f"the cast {', '.join('%' + c.name for c in casts)}, so only the normalization becomes one rms_norm op; the cast "
                 f"and the weight multiply stay separate ops (one more quantized tensor and NPU op for this norm)", stacklevel=2)
        shape = [int(norm.input.meta["val"].shape[-1])]
        fused = insert_call(gm.graph, replaced, aten.rms_norm.default, norm.input, shape, weight, float(norm.eps))
        for key in ("quantnpu", "nn_module_stack", "stack_trace"):
            if key in replaced.meta:
                fused.meta[key] = replaced.meta[key]
        replaced.replace_all_uses_with(fused)
        recomposed += 1
    gm.graph.eliminate_dead_code()
    return recomposed
