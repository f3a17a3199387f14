"""Running many windows through a decoder graph one layer at a time: memory bounded by a layer.

Passes that push the calibration windows through the model (smoothing statistics, sensitivity,
stage-one initialization, stage-two calibration, GPTQ's Hessians) need every intermediate value
of every window once, in window order per tensor; they need neither the whole model's activations
at once nor, while R1/R2 and the smoothing factors are still parameters, a baked copy of the
model (which doubles the weights). `LayerStream` runs the graph stage by stage: a stage is one
decoder layer (the embedding goes with layer 0, the final norm and lm_head with the last stage),
every window runs through it before the next stage starts, and only the values that later stages
read (the residual stream) are kept per window in between.

Stages come from the roles AnnotateRoles put on the graph: a node with a layer's role is in that
layer's stage, every other node as late as its readers allow (so a layer's input norm runs with the
layer). Weight-side nodes (input-independent: parameters and what is computed from them alone, such
as R1 W^T) are evaluated once per stage that reads them and dropped after it. With `baked=True` a
weight expression that reads a rotation or smoothing parameter is evaluated as BakeRotations folds
it (float64, cast to the parameter's dtype), so the values seen are exactly those of a baked copy of
the graph, without the copy. Within a window every node runs with the same inputs as a plain
forward, so every value is bit-identical to `gm(window)`'s (tested).

A graph whose layers are not in sequence (a node of layer i reading a later layer's value) cannot be
cut that way; it runs as one stage (the whole graph per window), which is still exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch.fx.node import map_arg
from tqdm import tqdm

from quantnpu.graph.meta import node_info
from quantnpu.graph.ops import ancestors, fetch_attr
from quantnpu.memory import release_freed_memory
from quantnpu.passes.fold_constants import evaluate_nodes, input_independent_nodes
from quantnpu.passes.folded import is_folded_target
from quantnpu.passes.weights import weight_tensor

Visit = Callable[[torch.fx.Node, object], None]


def baked_value(gm: torch.fx.GraphModule, expression: torch.fx.Node) -> torch.Tensor:
    """The value BakeRotations writes for a weight expression that reads a rotation or smoothing
    parameter: evaluated in float64 from the one plain parameter it reads, cast to that parameter's dtype."""
    from quantnpu.errors import GraphStructureError

    chain = set(ancestors(expression))
    sources = [n for n in chain if n.op == "get_attr" and not is_folded_target(n.target)]
    if len(sources) != 1:
        raise GraphStructureError(f"rotated weight reads {len(sources)} parameters, expected 1", expression.name)
    original = weight_tensor(gm, sources[0])
    value = evaluate_nodes(gm, {n for n in chain if n.op == "call_function"}, compute_dtype=torch.float64)[expression]
    if value.shape != original.shape:
        raise GraphStructureError(f"rotated weight has shape {tuple(value.shape)}, its parameter {tuple(original.shape)}",
                                  expression.name)
    return value.to(original.dtype)


def _reads_folded(expression: torch.fx.Node) -> bool:
    return any(n.op == "get_attr" and is_folded_target(n.target) for n in ancestors(expression))


class LayerStream:
    """See the module docstring. `stage_names`: "layers.0" ... "layers.N-1" (the last one also holds
    the final norm and lm_head), or ["graph"] when the graph cannot be cut by layer."""

    def __init__(self, gm: torch.fx.GraphModule, baked: bool = False) -> None:
        self.gm, self.baked = gm, baked
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.weight_side: set[torch.fx.Node] = input_independent_nodes(gm) | {n for n in gm.graph.nodes if n.op == "get_attr"}
        self.stage_of = self._assign_stages()
        count = max(self.stage_of.values(), default=0) + 1
        self.stage_names = [f"layers.{i}" for i in range(count)] if count > 1 else ["graph"]
        position = {node: i for i, node in enumerate(gm.graph.nodes)}
        order = sorted(self.stage_of, key=lambda n: (self.stage_of[n], position[n]))
        self.stages: list[list[torch.fx.Node]] = [[] for _ in range(count)]
        for node in order:
            self.stages[self.stage_of[node]].append(node)
        # the values a stage reads from earlier stages, and those it hands to later ones (for `forward`)
        self.stage_inputs: list[list[torch.fx.Node]] = [[] for _ in range(count)]
        self.stage_outputs: list[list[torch.fx.Node]] = [[] for _ in range(count)]
        for node in order:
            later = sorted({self.stage_of[u] for u in node.users if u in self.stage_of and self.stage_of[u] > self.stage_of[node]})
            if later:
                self.stage_outputs[self.stage_of[node]].append(node)
                for stage in later:
                    self.stage_inputs[stage].append(node)
        # the last node (in execution order) that reads each value: after it runs, the value is dropped
        step = {node: i for i, node in enumerate(order)}
        self.last_reader: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for node in order:
            readers = [u for u in node.users if u in step]
            if readers:
                self.last_reader.setdefault(max(readers, key=step.get), []).append(node)

    # -- planning ----------------------------------------------------------------------------

    def _assign_stages(self) -> dict[torch.fx.Node, int]:
        nodes = [n for n in self.gm.graph.nodes if n not in self.weight_side]
        layers = [info.layer for n in nodes if (info := node_info(n)) is not None and info.layer is not None]
        last = max(layers, default=0)
        stage: dict[torch.fx.Node, int] = {}
        for node in reversed(nodes):  # as late as the readers allow; a layer's own nodes in its stage
            info = node_info(node)
            readers = [stage[u] for u in node.users if u in stage]
            if info is not None and info.layer is not None:
                stage[node] = info.layer
            else:
                stage[node] = min(readers, default=last)
        backwards = next(((i, n) for n in nodes for i in n.all_input_nodes if i in stage and stage[i] > stage[n]), None)
        if backwards is not None:  # layers out of sequence: one stage, the whole graph (exact, not bounded)
            from quantnpu.diagnostics import warn

            warn(f"%{backwards[1].name} (layer stage {stage[backwards[1]]}) reads %{backwards[0].name} of a later layer "
                 f"(stage {stage[backwards[0]]}): the windows run through the whole graph at once, so memory is bounded "
                 "by the model, not by a layer")
            return dict.fromkeys(nodes, 0)
        return stage

    # -- running -------------------------------------------------------------------------------

    def _weight(self, node: torch.fx.Node, cache: dict) -> object:
        """A weight-side value, evaluated once per stage (and baked where asked)."""
        if node in cache:
            return cache[node]
        if node.op == "get_attr":
            value = fetch_attr(self.gm, node.target)
        elif self.baked and _reads_folded(node):
            value = baked_value(self.gm, node)
        else:
            args = map_arg(node.args, lambda n: self._weight(n, cache))
            kwargs = map_arg(node.kwargs, lambda n: self._weight(n, cache))
            value = node.target(*args, **kwargs)
        cache[node] = value
        return value

    def _inputs(self, window: torch.Tensor | tuple | list) -> dict[torch.fx.Node, object]:
        """The graph's placeholders bound to one window's values (a tensor, or a tuple in their order)."""
        values = list(window) if isinstance(window, (tuple, list)) else [window]
        if len(values) != len(self.placeholders):
            from quantnpu.errors import QuantNpuError

            raise QuantNpuError(f"the graph takes {len(self.placeholders)} inputs, a window gave {len(values)}")
        return dict(zip(self.placeholders, values))

    def _execute(self, node: torch.fx.Node, env: dict, cache: dict, inputs: dict) -> object:
        def value(n: torch.fx.Node):
            return self._weight(n, cache) if n in self.weight_side else env[n]

        if node.op == "placeholder":
            return inputs[node]
        args, kwargs = map_arg(node.args, value), map_arg(node.kwargs, value)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return args[0]  # output: its argument, as the interpreter returns it

    def run(self, windows: Sequence[torch.Tensor | tuple], visit: Visit | None = None, targets: set[torch.fx.Node] | None = None,
            keep_outputs: bool = False, progress: str | None = None,
            after_stage: Callable[[int], None] | None = None) -> list | None:
        """Run every window (a tensor, or a tuple of the graph's inputs) through the graph, stage by
        stage, under the caller's grad mode. `visit(node, value)` is called for each node of `targets`
        (every node when None), per node in window order. With `keep_outputs`, the graph's output value
        of each window (else nothing is kept: the logits of many windows are large). `after_stage(i)`
        runs once every window has been through stage i (`stage_of` says which stage a node is in):
        what later stages read of stage i is computed by then, so stage i's weights may change."""
        envs: list[dict] = [{} for _ in windows]
        bound = [self._inputs(w) for w in windows]
        outputs: list = [None] * len(windows)
        bar = tqdm(total=len(self.stages) * len(windows), desc=progress, unit="window", disable=progress is None, leave=False)
        for stage, nodes in enumerate(self.stages):
            cache: dict = {}
            for index, env in enumerate(envs):
                for node in nodes:
                    result = self._execute(node, env, cache, bound[index])
                    if node.op == "output":
                        if keep_outputs:
                            outputs[index] = result
                    else:
                        env[node] = result
                        if visit is not None and (targets is None or node in targets):
                            visit(node, result)
                    for done in self.last_reader.get(node, ()):
                        env.pop(done, None)
                bar.update()
            del cache
            if after_stage is not None:
                after_stage(stage)
            release_freed_memory()
        bar.close()
        return outputs if keep_outputs else None

    # -- training ------------------------------------------------------------------------------

    def _run_stage(self, stage: int, inputs: dict, *crossing) -> tuple:
        """Stage `stage` for one window: the values it reads from earlier stages (`crossing`, in
        `stage_inputs` order) in, the values later stages read (and, last, the graph's output) out."""
        env = dict(zip(self.stage_inputs[stage], crossing))
        cache: dict = {}
        output = None
        for node in self.stages[stage]:
            result = self._execute(node, env, cache, inputs)
            if node.op == "output":
                output = result
            else:
                env[node] = result
            for done in self.last_reader.get(node, ()):
                if done not in self.stage_outputs[stage]:
                    env.pop(done, None)
        return tuple(env[n] for n in self.stage_outputs[stage]) + (output,)

    def forward(self, *inputs: torch.Tensor, checkpoint: bool = True) -> object:
        """One window (the graph's inputs) through the graph, as `gm(*inputs)` computes it, for
        training: with `checkpoint`, each stage runs under torch.utils.checkpoint (non-reentrant), so
        backward keeps only the values that cross stages and recomputes one stage's activations (its
        weight expressions included: R1 W^T is not held for every layer at once) when it reaches it.
        The autograd graph is the plain forward's, so gradients are the same. A module whose forward
        depends on mutable state must have the same state when backward recomputes its stage."""
        import torch.utils.checkpoint

        bound = self._inputs(inputs)
        env: dict = {}
        output = None
        for stage in range(len(self.stages)):
            crossing = [env[n] for n in self.stage_inputs[stage]]
            if checkpoint:
                results = torch.utils.checkpoint.checkpoint(self._run_stage, stage, bound, *crossing, use_reentrant=False)
            else:
                results = self._run_stage(stage, bound, *crossing)
            *handed, output = results
            env.update(zip(self.stage_outputs[stage], handed))
            needed = {n for later in self.stage_inputs[stage + 1:] for n in later}
            for node in [n for n in env if n not in needed]:
                del env[node]
        return output
