"""PassManager: order, lint after every pass, stop_after, records, errors that name pass and node;
a bug in a pass (anything but a QuantNpuError) is an internal error, never reported as bad input."""

import pytest
import torch
import torch.fx

from quantnpu.errors import GraphStructureError, InternalError, PassFailedError, QuantNpuError
from quantnpu.passes.base import GraphPass, PassManager, PassResult, require


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
        require(not any(n.target == torch.ops.aten.linear.default for n in gm.graph.nodes), "a linear is left")


class _Buggy(GraphPass):
    """A planted bug: the kind of mistake a pass makes (a wrong key, a None where a node was meant)."""

    def __init__(self, error):
        self.error = error

    def call(self, gm):
        raise self.error


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


def test_lint_failure_is_an_internal_error_naming_the_pass():
    """A pass that leaves a malformed graph has a bug: not the user's input."""
    with pytest.raises(InternalError, match="internal error in pass _BreaksGraph: RuntimeError") as info:
        PassManager([_BreaksGraph()], verify=False).run(_gm())
    assert not isinstance(info.value, QuantNpuError)


@pytest.mark.parametrize("error", [KeyError("layers.0.q_proj"), TypeError("'NoneType' object is not subscriptable"),
                                   AssertionError("shapes differ"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                   ValueError("too many values to unpack"), AttributeError("'Node' object has no attribute 'x'")])
def test_a_bug_in_a_pass_is_not_reported_as_bad_input(error):
    with pytest.raises(InternalError) as info:
        PassManager([_First(), _Buggy(error)], verify=False).run(_gm())
    assert not isinstance(info.value, QuantNpuError)  # the CLI prints QuantNpuErrors as one-line user errors
    assert info.value.pass_name == "_Buggy" and info.value.cause is error and info.value.__cause__ is error
    assert str(info.value).startswith(f"internal error in pass _Buggy: {type(error).__name__}")


def test_pass_error_names_pass_and_node():
    with pytest.raises(PassFailedError, match=r"pass _RejectsRelu failed: node %relu: relu is not supported here") as info:
        PassManager([_RejectsRelu()], verify=False).run(_gm())
    assert info.value.cause.node_name == "relu"


def test_postcondition_failure_names_the_pass():
    with pytest.raises(PassFailedError, match="pass _EnsuresNoLinear failed: a linear is left"):
        PassManager([_EnsuresNoLinear()], verify=False).run(_gm())
