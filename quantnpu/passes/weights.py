"""Reading and replacing the parameters a graph's get_attr nodes refer to."""

from __future__ import annotations

import torch
import torch.fx

from quantnpu.errors import GraphStructureError
from quantnpu.graph.ops import fetch_attr


def weight_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise GraphStructureError("expected a parameter (get_attr) here", getattr(node, "name", None))
    return fetch_attr(gm, node.target)


def replace_weight(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Point `target` at a new tensor (the old one, maybe shared with the caller's model, is left
    untouched); keeps it a parameter or a buffer as it was."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, name)
    value = value.detach().to(old.dtype).contiguous()
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[name] = value


def add_weight(gm: torch.fx.GraphModule, name: str, value: torch.Tensor) -> str:
    """Register a new top-level parameter (name must not contain dots) and return its target."""
    if hasattr(gm, name):
        raise GraphStructureError(f"the module already has an attribute {name}")
    gm.register_parameter(name, torch.nn.Parameter(value.detach().contiguous(), requires_grad=False))
    return name


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def drop_unused_tensors(gm: torch.fx.GraphModule) -> int:
    """Delete the parameters and buffers that nothing in the graph reads (no get_attr of them or of a
    module holding them, no call_module of their module): e.g. the float weights PT2E's conversion
    leaves beside the quantized constants that replaced them. Returns the bytes dropped."""
    read = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}

    def is_read(name: str) -> bool:
        return name in read or any(name.startswith(target + ".") for target in read)

    dropped = 0
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if is_read(name):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters or attr in owner._buffers:
            delattr(owner, attr)
            dropped += tensor.numel() * tensor.element_size()
    return dropped
