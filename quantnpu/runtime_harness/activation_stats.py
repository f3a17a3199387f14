"""Statistics of the activations entering each annotated linear, gathered by interpreting the graph.

Per linear input tensor: max|x| / std(x) (how far the largest value sits from the bulk: the range
a per-tensor quantizer must cover, in units of the typical value) and kurtosis E[(x-mu)^4]/sigma^4
(3 for a Gaussian; large for outlier-heavy tensors). Averaged over the windows given.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx
from tqdm import tqdm

from quantnpu.graph.meta import node_info


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, sink: dict) -> None:
        super().__init__(gm)
        self.sink = sink

    def run_node(self, node: torch.fx.Node):
        info = node_info(node)
        if info is not None and node.target == torch.ops.aten.linear.default:
            x = self.env[node.args[0]].detach().double().flatten()
            std = x.std()
            self.sink[info.role]["max_over_std"].append((x.abs().max() / std).item())
            self.sink[info.role]["kurtosis"].append((((x - x.mean()) / std) ** 4).mean().item())
        return super().run_node(node)


class _InputCatcher(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, roles: set[str], sink: dict) -> None:
        super().__init__(gm)
        self.roles, self.sink = roles, sink

    def run_node(self, node: torch.fx.Node):
        info = node_info(node)
        if info is not None and info.role in self.roles and node.target == torch.ops.aten.linear.default:
            x = self.env[node.args[0]].detach()
            self.sink[info.role].append(x.reshape(-1, x.shape[-1]).clone())
        return super().run_node(node)


def linear_inputs(gm: torch.fx.GraphModule, windows: torch.Tensor, roles: set[str], desc: str = "linear inputs") -> dict[str, torch.Tensor]:
    """{role: the rows entering that annotated linear over all `windows`, [tokens, in_features]}."""
    sink: dict = defaultdict(list)
    catcher = _InputCatcher(gm, roles, sink)
    with torch.no_grad():
        for window in tqdm(windows, desc=desc, unit="window"):
            catcher.run(window.unsqueeze(0))
    return {role: torch.cat(rows) for role, rows in sink.items()}


def linear_input_stats(gm: torch.fx.GraphModule, windows: torch.Tensor, desc: str = "activation stats") -> dict[str, dict[str, float]]:
    """{role: {"max_over_std": .., "kurtosis": ..}} for every annotated linear of `gm`."""
    sink: dict = defaultdict(lambda: defaultdict(list))
    recorder = _Recorder(gm, sink)
    with torch.no_grad():
        for window in tqdm(windows, desc=desc, unit="window"):
            recorder.run(window.unsqueeze(0))
    return {role: {k: sum(v) / len(v) for k, v in stats.items()} for role, stats in sink.items()}
