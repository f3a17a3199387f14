"""PassManager: order, lint after every pass, stop_after, records, errors that name pass and node."""

import pytest
import torch
import torch.fx

from quantnpu.errors import GraphStructureError, PassFailedError, QuantNpuError
from quantnpu.passes.base import GraphPass, PassManager, PassResult


class _Linear2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _gm(module=None):
    return torch.export.export(module or _Linear2(), (torch.ones(1, 4),)).module()


class _Log(GraphPass):
    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    @property
    def name(self):
        return self.tag

    def call(self, gm):
        self.log.append(self.tag)
        return PassResult(gm, False)


class _First(GraphPass):
    def call(self, gm):
        return PassResult(gm, False)


class _Second(GraphPass):
    run_after = (_First,)

    def call(self, gm):
        return PassResult(gm, False)


class _ReluToSigmoid(GraphPass):
    def call(self, gm):
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.relu.default:
                node.target = torch.ops.aten.sigmoid.default
        return PassResult(gm, True)


class _BreaksGraph(GraphPass):
    """Uses a node before its definition: lint must catch it."""

    def call(self, gm):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        nodes[0].args = (nodes[-1],) + nodes[0].args[1:]
        return PassResult(gm, True)


class _RejectsRelu(GraphPass):
    def call(self, gm):
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.relu.default:
                raise GraphStructureError("relu is not supported here", node.name)
        return PassResult(gm, False)


class _EnsuresNoLinear(GraphPass):
    def call(self, gm):
        return PassResult(gm, False)

    def ensures(self, gm):
        assert not any(n.target == torch.ops.aten.linear.default for n in gm.graph.nodes), "a linear is left"


def test_runs_passes_in_order_and_records_each():
    log = []
    module = _Linear2()
    manager = PassManager([_Log(log, "one"), _Log(log, "two"), _ReluToSigmoid()], verify=False)
    gm = manager.run(_gm(module))
    assert log == ["one", "two"]
    assert [r.name for r in manager.records] == ["one", "two", "_ReluToSigmoid"]
    assert manager.records[2].modified and manager.records[2].summary == "-1 relu.default, +1 sigmoid.default"
    assert torch.ops.aten.sigmoid.default in {n.target for n in gm.graph.nodes}
    x = torch.randn(1, 4)
    torch.testing.assert_close(gm(x), module.b(torch.sigmoid(module.a(x))))
    assert "_ReluToSigmoid" in manager.report()


def test_stop_after_stops_there():
    log = []
    manager = PassManager([_Log(log, "one"), _Log(log, "two"), _Log(log, "three")], stop_after="two", verify=False)
    manager.run(_gm())
    assert log == ["one", "two"]


def test_stop_after_unknown_pass_is_an_error():
    with pytest.raises(QuantNpuError, match="stop_after='nope' names no pass"):
        PassManager([_First()], stop_after="nope")


def test_declared_order_is_enforced():
    PassManager([_First(), _Second()])
    with pytest.raises(QuantNpuError, match="_First must run before _Second"):
        PassManager([_Second(), _First()])


def test_lint_failure_names_the_pass():
    with pytest.raises(PassFailedError, match="pass _BreaksGraph failed"):
        PassManager([_BreaksGraph()], verify=False).run(_gm())


def test_pass_error_names_pass_and_node():
    with pytest.raises(PassFailedError, match=r"pass _RejectsRelu failed: node %relu: relu is not supported here") as info:
        PassManager([_RejectsRelu()], verify=False).run(_gm())
    assert info.value.cause.node_name == "relu"


def test_postcondition_failure_names_the_pass():
    with pytest.raises(PassFailedError, match="pass _EnsuresNoLinear failed: a linear is left"):
        PassManager([_EnsuresNoLinear()], verify=False).run(_gm())
