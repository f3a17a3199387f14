"""A stable, compact text form of an FX graph, and the diff of two such texts.

One line per node: `%name: f32[1,8,64] = aten.linear(%x, %w)  # role=layers.0.q_proj`.
Only names, targets, arguments, shapes and quantnpu meta appear, so the text is the same
from run to run and a per-pass test can state exactly what a pass changes.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torch.fx

from quantnpu.graph.meta import node_info, tensor_quant

_DTYPES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b1", torch.uint16: "u16",
}


def _type_of(node: torch.fx.Node) -> str:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        shape = ",".join(str(int(d)) for d in value.shape)
        return f": {_DTYPES.get(value.dtype, str(value.dtype))}[{shape}]"
    return ""


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target.name().replace("::", ".")  # e.g. aten.mul.Tensor; `.default` is implied
        return name.removesuffix(".default")
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.__name__}"
    return getattr(target, "__name__", str(target))


def _format_arg(arg) -> str:
    if isinstance(arg, torch.fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_format_arg(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, float):
        return repr(arg)
    if isinstance(arg, torch.dtype):
        return _DTYPES.get(arg, str(arg))
    return str(arg)


def format_node(node: torch.fx.Node) -> str:
    lhs = f"%{node.name}{_type_of(node)}"
    if node.op == "placeholder":
        text = f"{lhs} = placeholder"
    elif node.op == "get_attr":
        text = f"{lhs} = get_attr {node.target}"
    elif node.op == "output":
        return f"return {_format_arg(node.args[0])}"
    else:
        target = node.target if node.op == "call_module" else _target_name(node)
        args = [_format_arg(a) for a in node.args]
        args += [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
        text = f"{lhs} = {target}({', '.join(args)})"
    notes = [record.describe() for record in (node_info(node), tensor_quant(node)) if record is not None]
    notes = [n for n in notes if n]
    return f"{text}  # {' '.join(notes)}" if notes else text


def graph_text(gm: torch.fx.GraphModule, keep: Callable[[torch.fx.Node], bool] | None = None) -> str:
    """The whole graph (or the nodes `keep` selects), one node per line."""
    return "\n".join(format_node(n) for n in gm.graph.nodes if keep is None or keep(n))


def graph_diff(before: str, after: str) -> str:
    """Changed lines only: `-` for removed, `+` for added, in graph order."""
    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), n=0, lineterm="")
    return "\n".join(
        line for line in lines if not line.startswith(("---", "+++", "@@"))
    )
