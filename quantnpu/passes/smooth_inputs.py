"""SmoothUnrotatedInputs: static per-channel smoothing of the linear inputs no rotation reaches,
folded into the weights on both sides (METHOD.md, "Beyond the paper"; SmoothQuant's factor).

R4 is removed, so down_proj's input `m = act(gate) * up` keeps its outliers; R2 rotates within a
head but nothing mixes channels across o_proj's input. A factor `s_j > 0` per channel leaves the
float function unchanged:
- down_proj: `W_up[j, :] /= s_j` (and its bias), `W_down[:, j] *= s_j` (`m` is linear in `up`);
- o_proj: `W_v[c, :] /= s_c` for value channel c of KV head g (and its bias), `W_o[:, h*D + c] *= s_c`
  for every query head h reading KV head g (grouped-query attention: `g = h // (heads / kv_heads)`).
Each layer's factors are a parameter `quantnpu_S_<layer>_<down|o>` holding `t = log s` (positive by
construction; stage one may learn it), and each affected weight becomes a graph expression of it,
like FuseRotations' R1/R2; BakeRotations folds them all into the weights.

Factors from the calibration windows (per-channel max |X_j| of the input, max |W_:,j| of the
consuming weight as the graph computes it now, i.e. after R1/R2):
- `fixed`: `s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)` with one alpha for every layer;
- `search`: per layer the alpha of `alphas` with the smallest output error of the smoothed linear on
  a sample of calibration rows, with everything the factor rescales quantized at the plan's bits
  (the initialization rule's scales): the producer's output (up_proj's; V), the linear's input and
  its weight. (Without the producer's output the criterion picked high alphas almost everywhere and
  ended worse than one fixed alpha, in the table of bench/results/smoothing.md at commit f7afd8c: the
  factor squashes up_proj's outlier channels below their 8-bit step.)
- `learn`: the search's factors, then learned in stage one (LearnEncodings, `learn_smoothing`).
A channel that never fires (max |X_j| = 0) or a zero weight column keeps `s_j = 1`. Every factor
is recorded (`factors`, `report()`); the verifier checks that the function is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from tqdm import tqdm

from quantnpu.errors import GraphStructureError, QuantNpuError
from quantnpu.graph.meta import node_info, nodes_by_role, update_node_info
from quantnpu.graph.ops import ancestors, skip_passthrough_backward, skip_passthrough_forward
from quantnpu.passes.annotate_roles import AnnotateRoles, DecoderDims, attention_inputs
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes.fold_constants import evaluate_nodes
from quantnpu.passes.folded import SMOOTH_PREFIX, is_rotation_target, is_smoothing_target
from quantnpu.passes.fuse_rotations import FuseRotations, WeightOps
from quantnpu.passes.insert_observers import residual_stream_rotated, weight_is_rotated
from quantnpu.passes.plan_bit_widths import linear_bits
from quantnpu.passes.stream import LayerStream
from quantnpu.passes.weights import add_weight, weight_tensor
from quantnpu.quantizers.bit_plan import BitPlan
from quantnpu.quantizers.init_rules import TensorStats, initial_scale

aten = torch.ops.aten
SMOOTH_MODES = ("off", "fixed", "search", "learn")
SMOOTH_TARGETS = ("down_proj", "o_proj")
LOG_FACTOR_BOUND = math.log(1e5)  # factors stay in [1e-5, 1e5] (stage one clamps the learned ones too)


def smoothing_parameters(gm: torch.fx.GraphModule) -> list[tuple[str, torch.nn.Parameter]]:
    """The log-factor parameters `t = log s` (stage one learns them in `learn` mode)."""
    return [(name, p) for name, p in gm.named_parameters(recurse=False) if is_smoothing_target(name)]


@dataclass(frozen=True)
class SmoothingConfig:
    """`mode`: off | fixed | search | learn (learn: the search's factors as the start,
    stage one learns them). `alpha`: the fixed migration strength; `alphas`: the search's grid;
    `targets`: which inputs; `sample_rows`: calibration rows per layer kept for the search;
    `search_criterion`: "producer" (default) or "linear" (the linear alone, see the module doc)."""

    mode: str = "fixed"
    alpha: float = 0.5
    alphas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    targets: tuple[str, ...] = SMOOTH_TARGETS
    sample_rows: int = 2048
    search_criterion: str = "producer"  # "linear": the linear's input and weight only (the ablation)
    # positions at the start of each window left out of down_proj's statistics: the leading-token
    # split gives them their own 16-bit copy of the MLP (the pipeline sets it)
    skip_leading: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SMOOTH_MODES:
            raise QuantNpuError(f"smoothing: unknown mode {self.mode!r}: choose one of {', '.join(SMOOTH_MODES)}")
        for alpha in (self.alpha, *self.alphas):
            if not 0.0 <= alpha <= 1.0:
                raise QuantNpuError(f"smoothing: alpha must be in [0, 1], got {alpha}")
        if self.search_criterion not in ("producer", "linear"):
            raise QuantNpuError(f"smoothing: search criterion must be producer or linear, got {self.search_criterion!r}")
        if self.skip_leading < 0:
            raise QuantNpuError(f"smoothing: skip_leading must be >= 0, got {self.skip_leading}")
        if self.sample_rows < 1:
            raise QuantNpuError("smoothing: sample_rows must be at least 1")
        unknown = [t for t in self.targets if t not in SMOOTH_TARGETS]
        if unknown or not self.targets:
            raise QuantNpuError(f"smoothing: targets must be among {', '.join(SMOOTH_TARGETS)}, got {', '.join(self.targets) or 'none'}")


@dataclass
class LayerSmoothing:
    role: str                     # the smoothed linear, e.g. layers.3.down_proj
    alpha: float
    factors: torch.Tensor         # s, one per smoothed channel (KV channels for o_proj)
    input_max_ratio: float        # max|X| / mean_j max|X_j| before smoothing (how spiky the channels are)
    errors: dict[float, float] = field(default_factory=dict)  # search: alpha -> relative output error

    def describe(self) -> str:
        spread = f"s in [{float(self.factors.min()):.3g}, {float(self.factors.max()):.3g}]"
        return f"{self.role:<22} alpha {self.alpha:.2f}  {spread}  input max/mean-max {self.input_max_ratio:.1f}"


# ---- structure -------------------------------------------------------------------------------

def _smoothed_pairs(gm: torch.fx.GraphModule, targets: Sequence[str]) -> list[tuple[torch.fx.Node, torch.fx.Node, str]]:
    """(producer linear whose output rows get 1/s, consumer linear whose input columns get s, kind),
    each checked to be a place where the scaling commutes exactly."""
    by_role = nodes_by_role(gm)
    pairs = []
    layer = 0
    while f"layers.{layer}.q_proj" in by_role:
        if "down_proj" in targets:
            up, down = by_role[f"layers.{layer}.up_proj"], by_role[f"layers.{layer}.down_proj"]
            product = skip_passthrough_backward(down.args[0])
            if product.target != aten.mul.Tensor or sum(skip_passthrough_backward(a) is up for a in product.args) != 1:
                raise GraphStructureError("down_proj's input is not act(gate) * up: smoothing cannot fold into up_proj", down.name)
            if skip_passthrough_forward(up) != [product]:
                raise GraphStructureError("up_proj's output is read outside the gated product: smoothing would change it", up.name)
            pairs.append((up, down, "down_proj"))
        if "o_proj" in targets:
            v, o = by_role[f"layers.{layer}.v_proj"], by_role[f"layers.{layer}.o_proj"]
            attention = by_role[f"layers.{layer}.attention"]
            if skip_passthrough_backward(o.args[0]) is not attention:
                raise GraphStructureError("o_proj does not read the attention output directly: smoothing cannot fold into v_proj", o.name)
            value = attention_inputs(attention)[2]
            if skip_passthrough_forward(v) != [attention] or skip_passthrough_backward(value) is not v:
                raise GraphStructureError("v_proj's output reaches attention through more than layout ops: smoothing would change it", v.name)
            pairs.append((v, o, "o_proj"))
        layer += 1
    return pairs


def current_weight(gm: torch.fx.GraphModule, linear: torch.fx.Node) -> torch.Tensor:
    """The weight the linear reads now, in float64 (a rotated weight is a graph expression: evaluated)."""
    expression = linear.args[1]
    if expression.op == "get_attr":
        return weight_tensor(gm, expression).double()
    chain = {n for n in ancestors(expression) if n.op == "call_function"}
    return evaluate_nodes(gm, chain, compute_dtype=torch.float64)[expression].double()


def _channel_max(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(0).double()


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def _parameter_name(layer: int, kind: str) -> str:
    return f"{SMOOTH_PREFIX}{layer}_{'down' if kind == 'down_proj' else 'o'}"


class SmoothUnrotatedInputs(GraphPass):
    """See the module docstring. `layers`: one `LayerSmoothing` per smoothed linear after a run."""

    run_after = (AnnotateRoles, FuseRotations)

    def __init__(self, calibration: Sequence[torch.Tensor], config: SmoothingConfig = SmoothingConfig(),
                 plan: BitPlan | None = None, progress: bool = False) -> None:
        if config.mode in ("search", "learn") and plan is None:
            raise QuantNpuError(f"smoothing {config.mode} needs the bit plan (the bits it quantizes at)")
        self.calibration, self.config, self.plan, self.progress = list(calibration), config, plan, progress
        self.layers: list[LayerSmoothing] = []

    @property
    def _choice(self) -> str:
        """How the factors are chosen: learn starts from the search's (stage one refines them)."""
        return "search" if self.config.mode == "learn" else self.config.mode

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if any(n.op == "get_attr" and is_smoothing_target(n.target) for n in gm.graph.nodes):
            raise GraphStructureError("the graph is already smoothed")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.layers = []
        if self.config.mode == "off":
            return PassResult(gm, False)
        if not self.calibration:
            raise QuantNpuError("smoothing needs calibration batches")
        dims = DecoderDims(gm)
        pairs = _smoothed_pairs(gm, self.config.targets)
        stream_rotated = residual_stream_rotated(gm)
        candidates, errors = {}, {}
        bar = tqdm(total=len(pairs), desc="smoothing factors", unit="linear", disable=not self.progress)

        def choose(done: list, maxima: dict, samples: dict) -> None:
            """The candidate factors (and the search's errors) of the pairs whose statistics are complete."""
            for producer, consumer, kind in done:
                weight = current_weight(gm, consumer)
                x_max, w_max = maxima[(consumer, "input")], weight.abs().amax(0)
                if kind == "o_proj":  # one factor per KV channel: the max over the query heads reading it
                    x_max, w_max = (self._per_kv_channel(v, dims) for v in (x_max, w_max))
                candidates[consumer] = self._candidates(x_max, w_max)
                if self._choice == "search":
                    rotated = weight_is_rotated(node_info(consumer), stream_rotated)
                    rows = {key: torch.cat(samples.pop(key)) for key in [k for k in samples if k[0] is consumer]}
                    errors[consumer] = {alpha: self._output_error(consumer, kind, weight, rows, maxima, s, dims, rotated)
                                        for alpha, s in candidates[consumer].items()}
                bar.update()

        maxima = self._observe(gm, pairs, choose)
        bar.close()
        input_max = {c: maxima[(c, "input")] for _, c, _ in pairs}
        if self._choice == "search":
            chosen = {c: min(e, key=e.get) for c, e in errors.items()}
        else:
            chosen = dict.fromkeys(candidates, self.config.alpha)
        self._fold_all(gm, pairs, {c: candidates[c][chosen[c]] for c in candidates}, dims)
        for producer, consumer, kind in pairs:
            info = node_info(consumer)
            ratio = float(input_max[consumer].max() / input_max[consumer].mean().clamp_min(1e-30))
            self.layers.append(LayerSmoothing(info.role, chosen[consumer], candidates[consumer][chosen[consumer]].float(),
                                              ratio, errors.get(consumer, {})))
            for node in (producer, consumer):
                update_node_info(node, smoothing=f"{_parameter_name(info.layer, kind)} (alpha {chosen[consumer]:.2f})")
        return PassResult(gm, bool(pairs))

    def _fold_all(self, gm, pairs, factors, dims) -> None:
        first = next(iter(gm.graph.nodes))
        for producer, consumer, kind in pairs:
            self._fold(gm, first, _parameter_name(node_info(consumer).layer, kind), producer, consumer, factors[consumer], kind, dims)

    # -- statistics ------------------------------------------------------------------------------

    def _observe(self, gm, pairs, choose) -> dict:
        """Per-channel max |x| over the calibration windows of each consumer's input ("input") and
        each producer's output ("producer"), keyed (consumer, what); for the search also an evenly
        strided sample of their rows, the same rows of each, and of the gate activation ("gate")
        that multiplies up_proj's output. The windows stream layer by layer; once every window has been
        through a pair's layer, `choose(pairs, maxima, samples)` takes its statistics (and drops its
        samples: one layer's rows at a time). Returns the maxima."""
        # the activations of the baked model, one layer at a time (no baked copy of the weights)
        measured = LayerStream(gm, baked=True)
        by_name = {n.name: n for n in gm.graph.nodes}
        watched: dict[torch.fx.Node, list[tuple[torch.fx.Node, str]]] = {}
        for producer, consumer, kind in pairs:
            watched.setdefault(by_name[consumer.args[0].name], []).append((consumer, "input"))
            watched.setdefault(by_name[producer.name], []).append((consumer, "producer"))
            if kind == "down_proj":
                product = skip_passthrough_backward(consumer.args[0])
                gate = next(a for a in product.args if skip_passthrough_backward(a) is not producer)
                watched.setdefault(by_name[gate.name], []).append((consumer, "gate"))
        maxima: dict[tuple, torch.Tensor] = {}
        samples: dict[tuple, list[torch.Tensor]] = {}
        per_window = math.ceil(self.config.sample_rows / len(self.calibration))

        skip = self.config.skip_leading

        def visit(node, whole):
            for key in watched[node]:
                value = whole[:, skip:] if skip and node_info(key[0]).kind == "down_proj" and whole.dim() >= 3 else whole
                if key[1] != "gate":
                    channel = _channel_max(value)
                    maxima[key] = channel if key not in maxima else torch.maximum(maxima[key], channel)
                if self._choice == "search":
                    rows = value.detach().reshape(-1, value.shape[-1])
                    samples.setdefault(key, []).append(rows[:: max(1, rows.shape[0] // per_window)][:per_window].float().clone())

        due: dict[int, list] = {}
        for pair in pairs:
            due.setdefault(measured.stage_of[pair[1]], []).append(pair)
        with torch.no_grad():
            measured.run(self.calibration, visit, targets=set(watched), progress="smoothing statistics" if self.progress else None,
                         after_stage=lambda stage: choose(due.get(stage, []), maxima, samples))
        return maxima

    # -- factors ---------------------------------------------------------------------------------

    def _candidates(self, x_max: torch.Tensor, w_max: torch.Tensor) -> dict[float, torch.Tensor]:
        alphas = self.config.alphas if self._choice == "search" else (self.config.alpha,)
        live = (x_max > 0) & (w_max > 0)
        found = {}
        for alpha in alphas:
            s = torch.ones_like(x_max)
            s[live] = x_max[live].pow(alpha) / w_max[live].pow(1.0 - alpha)
            found[alpha] = s.clamp(math.exp(-LOG_FACTOR_BOUND), math.exp(LOG_FACTOR_BOUND))
        return found

    @staticmethod
    def _per_kv_channel(values: torch.Tensor, dims: DecoderDims) -> torch.Tensor:
        group = dims.heads // dims.kv_heads
        return values.reshape(dims.kv_heads, group, dims.head_dim).amax(1).reshape(-1)

    @staticmethod
    def _expand(factors: torch.Tensor, kind: str, dims: DecoderDims) -> torch.Tensor:
        """The factor of every input column of the consumer (o_proj: each query head takes its KV head's)."""
        if kind == "down_proj":
            return factors
        group = dims.heads // dims.kv_heads
        return factors.reshape(dims.kv_heads, 1, dims.head_dim).expand(dims.kv_heads, group, dims.head_dim).reshape(-1)

    def _output_error(self, consumer, kind, weight, samples, maxima, factors, dims, weight_rotated: bool) -> float:
        """Relative error of the consumer's output on the sampled rows after smoothing by `factors`,
        with what the smoothing changes quantized at the plan's bits (initialization rule): the
        producer's output (up_proj's 8-bit output, read through the gate product; V at KV bits,
        whose attention average o_proj reads, modelled as o/s on V's grid), the consumer's input
        and its weight."""
        info = node_info(consumer)
        input_bits, weight_bits = linear_bits(self.plan, info.role, bool(info.input_rotated))
        columns = self._expand(factors, kind, dims)
        x = samples[(consumer, "input")].double()
        if self.config.search_criterion == "linear":
            smoothed_x = x / columns
        elif kind == "down_proj":
            producer_bits, _ = self.plan.tensor_bits([info.role.replace("down_proj", "up_proj") + ".output"])
            up = samples[(consumer, "producer")].double() / factors
            up_step = (maxima[(consumer, "producer")] / factors).max() / (2 ** (producer_bits - 1) - 1)
            smoothed_x = samples[(consumer, "gate")].double() * _fake_quantize(up, up_step, 2 ** (producer_bits - 1) - 1, -2 ** (producer_bits - 1))
        else:
            v_step = (maxima[(consumer, "producer")] / factors).max() / (2 ** (self.plan.kv - 1) - 1)
            smoothed_x = _fake_quantize(x / columns, v_step, 2 ** (self.plan.kv - 1) - 1, -2 ** (self.plan.kv - 1))
        smoothed_w = weight * columns
        if bool(info.input_rotated) and input_bits <= 4:
            x_scale = initial_scale(TensorStats.of(smoothed_x), input_bits, True)
        else:  # Max-Min over the whole calibration set: its max is known per channel
            x_scale = (maxima[(consumer, "input")] / columns).max() / (2 ** (input_bits - 1) - 1)
        w_scale = initial_scale(TensorStats.of(smoothed_w, axis=0), weight_bits, weight_rotated).reshape(-1, 1)
        qmax_x, qmax_w = 2 ** (input_bits - 1) - 1, 2 ** (weight_bits - 1) - 1
        quantized = _fake_quantize(smoothed_x, x_scale, qmax_x, -qmax_x - 1) @ \
            _fake_quantize(smoothed_w, w_scale, qmax_w, -qmax_w).T
        reference = x @ weight.T
        return float((quantized - reference).norm() / reference.norm().clamp_min(1e-30))

    # -- the rewrite -----------------------------------------------------------------------------

    def _fold(self, gm, first, name, producer, consumer, factors, kind, dims) -> None:
        """`factors` as a log-factor parameter `name`, divided out of the producer's rows (and bias)
        and multiplied into the consumer's input columns, as weight-side ops."""
        dtype = weight_tensor(gm, next(n for n in ancestors(consumer.args[1]) if n.op == "get_attr"
                                       and not is_rotation_target(n.target))).dtype
        add_weight(gm, name, factors.log().to(dtype))
        with gm.graph.inserting_before(first):
            log_factors = gm.graph.get_attr(name)
        log_factors.meta["val"] = torch.empty(factors.shape, dtype=dtype, device="meta")
        # producer rows / s (and its bias)
        build = WeightOps(gm, producer)
        inverse = build.op(aten.exp.default, build.op(aten.neg.default, log_factors))
        rows = build.op(aten.reshape.default, inverse, [-1, 1])
        weight = build.op(aten.mul.Tensor, producer.args[1], rows)
        bias = producer.args[2] if len(producer.args) > 2 else None
        if bias is not None:
            bias = build.op(aten.mul.Tensor, bias, inverse)
        producer.args = (producer.args[0], weight) + ((bias,) if bias is not None else ()) + tuple(producer.args[3:])
        # consumer columns * s
        build = WeightOps(gm, consumer)
        scale = build.op(aten.exp.default, log_factors)
        if kind == "o_proj":
            group = dims.heads // dims.kv_heads
            scale = build.op(aten.reshape.default, scale, [dims.kv_heads, 1, dims.head_dim])
            scale = build.op(aten.expand.default, scale, [dims.kv_heads, group, dims.head_dim])
        columns = build.op(aten.reshape.default, scale, [1, -1])
        consumer.args = (consumer.args[0], build.op(aten.mul.Tensor, consumer.args[1], columns)) + tuple(consumer.args[2:])

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for name, parameter in smoothing_parameters(gm):
            if not torch.isfinite(parameter).all():
                raise QuantNpuError(f"smoothing factors {name} are not finite")

    def report(self) -> str:
        """One line per smoothed linear: alpha, the range of its factors, how spiky its input was."""
        return "\n".join(layer.describe() for layer in self.layers)
