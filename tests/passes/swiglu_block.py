"""A residual SwiGLU block with roles on its linears: the smallest graph with every kind of
bit-plan decision, shared by the observer, bit-width and calibration tests."""

import torch

from quantnpu.graph.meta import NodeInfo, set_node_info
from quantnpu.passes import InsertStaticObservers, PlanBitWidths, PrepareForQnn, StaticCalibration
from quantnpu.quantizers.bit_plan import BitPlan
from tests.graph_testing import run_passes

HIDDEN, INTERMEDIATE = 16, 32


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate_proj = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = torch.nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x):
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def mlp_graph(rotated: bool = True) -> torch.fx.GraphModule:
    """The block after PrepareForQnn; gate/up read a rotated input when `rotated` (down never does)."""
    gm = torch.export.export(Mlp(), (torch.randn(1, 4, HIDDEN),)).module()
    for node in gm.graph.nodes:
        if node.target == torch.ops.aten.linear.default:
            kind = node.args[1].target.split(".")[0]
            set_node_info(node, NodeInfo(role=f"layers.0.{kind}", kind=kind, layer=0, input_rotated=rotated and kind != "down_proj"))
    return run_passes(gm, [PrepareForQnn()])


def batches(count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, 4, HIDDEN, generator=generator) for _ in range(count)]


def calibrated(bits: str = "4-8-8", rotated: bool = True, overrides=()):
    """(fake-quant graph, legalization deviations) of the block under the plan `bits`."""
    planner = PlanBitWidths(BitPlan.parse(bits, overrides))
    fake_quant = run_passes(mlp_graph(rotated), [InsertStaticObservers(), planner, StaticCalibration(batches(), progress=False)])
    return fake_quant, planner.deviations
