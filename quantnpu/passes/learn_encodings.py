"""LearnEncodings (stage one; METHOD.md "Stage one", paper Sec. 4.3.1): learn the linears' scales
together with R1 and every R2, on the float graph whose weights FuseRotations made functions of
the rotation parameters.

1. Quantizer sites (`stage_one_sites`): which linear inputs and weights are fake-quantized during
   stage one, at the bits the plan will give them (`plan_bit_widths.linear_bits`: after AssignBitWidths'
   promotions and HTP legalization). `selective` (the paper's): the rotated linear inputs (q/k/v,
   gate/up through R1; o_proj through R2) and every decoder-layer weight; `joint`: every linear's
   input and weight, lm_head and the unrotated down_proj inputs too; `rotations`: the selective
   sites with fixed scales, only R1/R2 learned. Everything else (linear outputs, K/V, non-linear
   ops, lm_head in selective mode) stays float in this stage.
2. `insert_stage_one_quantizers` puts a `LearnableQuantizer` module on each site (one per tensor and
   bit width: q/k/v share their input's), initialized from the calibration batches by the
   rotation-and-bit-width-aware rule (`init="maxmin"`: Max-Min everywhere, the ablation).
3. Training: next-token cross-entropy on the calibration windows (or KL to the float graph's
   logits), plus `local_weight * sum mean((X - x_hat)^2)` over the activation quantizers for the
   first `local_steps` steps; SGD with cosine decay on the scales (relative parametrization, see
   `quantizers/learnable.py`), Cayley SGD on R1/R2. `simulate="dynamic"`: activations quantized per
   token during training (SpinQuant's way); their static encodings then come from stage two.
   With `learn_smoothing` (SmoothUnrotatedInputs' `learn` mode) the smoothing log-factors are
   learned too (SGD, `lr_smoothing`, bounded) and down_proj's smoothed input becomes a site, so the
   factors see the 8-bit error they are to reduce; BakeRotations folds them afterwards.
   Under `torchrun` (torch.distributed initialized) each rank takes its share of every step's
   windows and gradients are summed across ranks. Checkpoints every `checkpoint_every` steps
   (atomic), `resume` continues bit-identically, Ctrl-C finishes the step, checkpoints and says how
   to resume.
4. Written back: R1/R2 into their parameters (float64 Cayley masters, orthogonality checked), each
   learned scale as an `Encoding` on its linears (`TensorQuant.learned_input` /
   `learned_weight`); the quantizer modules are removed. The float graph computes the same function
   (the rotations are orthogonal), which the verifier checks. BakeRotations follows, and
   StaticCalibration (stage two) keeps the learned encodings and calibrates the rest.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from tqdm import tqdm

from quantnpu.distributed import all_reduce_, rank_and_world
from quantnpu.errors import GraphStructureError, Interrupted, QuantNpuError
from quantnpu.fileio import atomic_path
from quantnpu.graph.equivalence import logits_of
from quantnpu.graph.meta import node_info, tensor_quant, update_tensor_quant
from quantnpu.graph.ops import LINEAR
from quantnpu.memory import release_freed_memory
from quantnpu.passes.assign_bit_widths import AssignBitWidths
from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes.fuse_rotations import FuseRotations, is_rotation_target
from quantnpu.passes.insert_observers import residual_stream_rotated, weight_is_rotated
from quantnpu.passes.plan_bit_widths import linear_bits
from quantnpu.passes.smooth_inputs import LOG_FACTOR_BOUND, SmoothUnrotatedInputs, smoothing_parameters
from quantnpu.passes.stream import LayerStream
from quantnpu.quantizers.bit_plan import BitPlan
from quantnpu.quantizers.init_rules import initial_scale, max_min_scale
from quantnpu.quantizers.learnable import CayleySGD, LearnableQuantizer, orthogonality_error
from quantnpu.quantizers.observers import RunningStats

OPTIMIZE = ("none", "rotations", "joint", "selective")
INITS = ("rule", "maxmin")
SIMULATIONS = ("static", "dynamic")
LOSSES = ("ce", "kl")
MODULE_PREFIX = "quantnpu_stage_one_"
ORTHOGONALITY_TOLERANCE = 1e-5
CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class StageOneConfig:
    """Stage one's settings. Defaults are sized for a 2-core CPU: one calibration window per step
    (the graph's batch and length are fixed at export, so `batch` windows are run one after another
    and their gradients accumulated; under torchrun they are split across ranks), 32 steps.
    The paper: 512 steps of 2 x 2 x 2048 tokens, lr 0.1 rotations / 0.01 scales, SGD, cosine decay,
    local loss for the first 128 steps. Rotation lr, measured on SmolLM2-135M with 10% promotion
    (norms then quantized op by op): with 4-bit weights a large lr helps, but at 8-8-8, where the
    learned sites carry little error, lr 2.0 walks R1 away from the Hadamard start and raised the ppl
    from 90.6 (10% alone) to 179.8 (32 steps at 512), while 0.1 left it at 90.5 (the 8-8-8 rows of
    bench/results/stage_one.md and stage_one_lr01.md at commit 2cfc62f). The default is the paper's
    0.1; `lr_rotation=2.0` is the choice for 4-bit weights (bench/results/stage_one.md's 4-bit rows).
    The scale lr 0.01 is the paper's."""

    optimize: str = "selective"
    steps: int = 32
    batch: int = 1                  # calibration windows per step (accumulated; split across ranks)
    local_steps: int | None = None  # steps with the local loss; None: a quarter of `steps` (paper 128/512)
    local_weight: float = 1.0       # lambda of the local loss
    lr_rotation: float = 0.1        # Cayley SGD (the paper's); the step is also capped at 1/||A||_1 (see below)
    lr_scale: float = 0.01          # relative: one SGD step moves a scale by lr x its own size x its gradient
    momentum: float = 0.0           # for both optimizers
    learn_smoothing: bool = False   # SmoothUnrotatedInputs' log-factors learned too (plain SGD, `lr_smoothing`)
    lr_smoothing: float = 0.01      # on log s: one step changes a factor by ~lr x gradient, relatively
    loss: str = "ce"                # "ce": next-token cross-entropy; "kl": KL to the float graph's logits
    init: str = "rule"
    simulate: str = "static"
    seed: int = 0                   # order of the calibration windows
    checkpoint: str | None = None
    checkpoint_every: int = 8
    resume: bool = False

    def __post_init__(self) -> None:
        for name, value, choices in (("optimize", self.optimize, OPTIMIZE), ("init", self.init, INITS),
                                     ("simulate", self.simulate, SIMULATIONS), ("loss", self.loss, LOSSES)):
            if value not in choices:
                raise QuantNpuError(f"stage one: {name} {value!r} is not one of {', '.join(choices)}")
        for name in ("steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise QuantNpuError(f"stage one: {name} must be at least 1, got {getattr(self, name)}")
        if self.local_steps is not None and not 0 <= self.local_steps <= self.steps:
            raise QuantNpuError(f"stage one: local_steps must be in [0, steps], got {self.local_steps}")
        for name in ("lr_rotation", "lr_scale", "local_weight", "momentum", "lr_smoothing"):
            if not getattr(self, name) >= 0:
                raise QuantNpuError(f"stage one: {name} must be >= 0, got {getattr(self, name)}")
        if self.resume and not self.checkpoint:
            raise QuantNpuError("stage one: resume needs a checkpoint path")

    @property
    def t_local(self) -> int:
        return self.steps // 4 if self.local_steps is None else self.local_steps

    def fingerprint(self) -> dict:
        """What a checkpoint must agree on to be resumed (not where it is written or how often)."""
        values = dataclasses.asdict(self)
        for key in ("checkpoint", "checkpoint_every", "resume"):
            values.pop(key)
        return values


@dataclass
class QuantizerSite:
    """One stage-one quantizer: a linear input (a tensor at some bits, shared by the linears
    reading it so) or one linear's weight."""

    what: str                          # "input" or "weight"
    source: torch.fx.Node              # the tensor quantized
    linears: list[torch.fx.Node]
    bits: int
    rotated: bool
    learn: bool
    name: str = ""                     # its module's attribute name
    module: LearnableQuantizer | None = None
    node: torch.fx.Node | None = None  # its call_module node


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    task_loss: float
    local_loss: float
    seconds: float


def _linears(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == LINEAR and node_info(n) is not None]


def stage_one_sites(gm: torch.fx.GraphModule, plan: BitPlan, optimize: str = "selective",
                    legalize: bool = True, smoothed_inputs: bool = False) -> list[QuantizerSite]:
    """The quantizer sites of stage one (see the module docstring), in graph order.
    `smoothed_inputs`: the inputs SmoothUnrotatedInputs smoothed are sites too (down_proj's; o_proj's
    is one already), so that learned smoothing factors see the error they are to reduce."""
    stream_rotated = residual_stream_rotated(gm)
    inputs: dict[tuple[torch.fx.Node, int], QuantizerSite] = {}
    weights: list[QuantizerSite] = []
    learn = optimize in ("selective", "joint")
    for linear in _linears(gm):
        info = node_info(linear)
        if info.kind == "lm_head" and optimize != "joint":
            continue
        record = tensor_quant(linear)
        promoted = None
        if record is not None and record.promoted_input_bits:
            promoted = (record.promoted_input_bits, "promoted")
        input_bits, weight_bits = linear_bits(plan, info.role, bool(info.input_rotated), promoted, legalize)
        if info.input_rotated or optimize == "joint" or (smoothed_inputs and info.smoothing is not None and info.kind == "down_proj"):
            key = (linear.args[0], input_bits)
            if key not in inputs:
                inputs[key] = QuantizerSite("input", linear.args[0], [], input_bits, bool(info.input_rotated), learn)
            inputs[key].linears.append(linear)
        weights.append(QuantizerSite("weight", linear.args[1], [linear], weight_bits,
                                     weight_is_rotated(info, stream_rotated), learn))
    sites = list(inputs.values()) + weights
    for site in sites:
        site.name = f"{MODULE_PREFIX}{node_info(site.linears[0]).role.replace('.', '_')}_{site.what}"
    return sites


def insert_stage_one_quantizers(gm: torch.fx.GraphModule, plan: BitPlan, optimize: str = "selective",
                                legalize: bool = True, simulate: str = "static", smoothed_inputs: bool = False) -> list[QuantizerSite]:
    """Put a `LearnableQuantizer` (scale 1 until `initialize_scales`) on every site; returns the sites."""
    sites = stage_one_sites(gm, plan, optimize, legalize, smoothed_inputs)
    for site in sites:
        if site.what == "weight":
            channels = site.source.meta["val"].shape[0]
            site.module = LearnableQuantizer(torch.ones(channels), site.bits, axis=0, restricted=True, learn=site.learn)
        else:
            site.module = LearnableQuantizer(torch.ones(1), site.bits, learn=site.learn and simulate == "static",
                                             dynamic=simulate == "dynamic")
        gm.add_submodule(site.name, site.module)
        with gm.graph.inserting_after(site.source):
            site.node = gm.graph.call_module(site.name, (site.source,))
        site.node.meta["val"] = site.source.meta.get("val")
        index = 0 if site.what == "input" else 1
        for linear in site.linears:
            linear.update_arg(index, site.node)
    gm.recompile()
    return sites


def remove_stage_one_quantizers(gm: torch.fx.GraphModule, sites: Sequence[QuantizerSite]) -> None:
    for site in sites:
        site.node.replace_all_uses_with(site.source)
        gm.graph.erase_node(site.node)
        delattr(gm, site.name)
    gm.recompile()


def initialize_scales(gm: torch.fx.GraphModule, sites: Sequence[QuantizerSite], batches: Sequence[torch.Tensor],
                      init: str = "rule", progress: bool = False) -> None:
    """Each quantizer's initial scale from the float graph's values on `batches` (weights per
    output channel): the initialization rule, or Max-Min everywhere with `init="maxmin"`. Under
    torch.distributed each rank observes its share and the statistics are reduced."""
    rank, world = rank_and_world()
    stats = {site.name: RunningStats(0 if site.what == "weight" else None) for site in sites}
    by_module = {id(site.module): site for site in sites}

    def observe(module, args, _output):
        site = by_module[id(module)]
        if site.what == "weight" and stats[site.name].count:
            return  # a weight is the same every window
        stats[site.name].update(args[0])

    hooks = [site.module.register_forward_hook(observe) for site in sites]
    for site in sites:
        site.module.enabled = False
    try:
        with torch.no_grad():  # layer by layer; each quantizer sees the windows in order, as in a forward each
            LayerStream(gm).run(list(batches)[rank::world], progress="stage one init" if progress and not rank else None)
    finally:
        for hook in hooks:
            hook.remove()
        for site in sites:
            site.module.enabled = True
    for site in sites:
        s = stats[site.name]
        if s.count == 0:
            raise GraphStructureError(f"stage one quantizer {site.name} saw no data", site.source.name)
        if world > 1:
            all_reduce_([s.minimum], torch.distributed.ReduceOp.MIN)
            all_reduce_([s.maximum], torch.distributed.ReduceOp.MAX)
            counts = torch.tensor([float(s.count)])
            all_reduce_([s.total, s.total_squares, counts])
            s.count = float(counts)
        tensor_stats = s.tensor_stats()
        where = f"%{site.source.name} ({node_info(site.linears[0]).role} {site.what})"
        if init == "maxmin":
            scale = max_min_scale(tensor_stats, site.bits)
        else:
            scale = initial_scale(tensor_stats, site.bits, site.rotated, where=where)
        with torch.no_grad():
            site.module.initial_scale.copy_(scale.float().reshape(-1))
            site.module.relative.fill_(1.0)


def rotation_parameters(gm: torch.fx.GraphModule) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in gm.named_parameters(recurse=False) if is_rotation_target(name)]


class LearnEncodings(GraphPass):
    """See the module docstring. After a run: `history` (a `StepRecord` per step),
    `orthogonality` (the largest ||R^T R - I|| of the learned rotations), `sites`,
    `float_step_seconds` (with `measure_float_step`: one float forward+backward of a step's
    windows, quantizers off, the same parameters learned)."""

    run_after = (FuseRotations, SmoothUnrotatedInputs, AssignBitWidths)

    def __init__(self, plan: BitPlan, calibration: Sequence[torch.Tensor], config: StageOneConfig = StageOneConfig(),
                 progress: bool = False, legalize: bool = True, measure_float_step: bool = False) -> None:
        self.plan, self.calibration, self.config = plan, list(calibration), config
        self.progress, self.legalize, self.measure_float_step = progress, legalize, measure_float_step
        self.history: list[StepRecord] = []
        self.orthogonality = 0.0
        self.sites: list[QuantizerSite] = []
        self.float_step_seconds: float | None = None
        self.interrupted_at: int | None = None

    # -- the pass --------------------------------------------------------------------------------

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        config = self.config
        if config.optimize == "none":
            return PassResult(gm, False)
        if not self.calibration:
            raise QuantNpuError("stage one needs calibration batches")
        rank, world = rank_and_world()
        if config.batch % world:
            raise QuantNpuError(f"stage one: batch {config.batch} does not split over {world} ranks")
        trainable_before = {name: p.requires_grad for name, p in gm.named_parameters()}
        for p in gm.parameters():
            p.requires_grad_(False)
        self.sites = insert_stage_one_quantizers(gm, self.plan, config.optimize, self.legalize, config.simulate,
                                                 smoothed_inputs=config.learn_smoothing)
        self._stream = LayerStream(gm)
        try:
            checkpoint = self._load_checkpoint(gm) if config.resume else None
            if checkpoint is None:
                initialize_scales(gm, self.sites, self.calibration, config.init, self.progress)
            self._train(gm, checkpoint)
            self._write_back(gm)
        finally:
            remove_stage_one_quantizers(gm, self.sites)
            for name, p in gm.named_parameters():
                p.requires_grad_(trainable_before.get(name, False))
        return PassResult(gm, True)

    # -- training --------------------------------------------------------------------------------

    def _windows(self, step: int) -> list[torch.Tensor]:
        """This rank's windows of `step`: a fixed permutation of the calibration batches per epoch
        (seeded), so a resumed run sees what an uninterrupted one would."""
        rank, world = rank_and_world()
        n = len(self.calibration)
        picked = []
        for position in range(step * self.config.batch, (step + 1) * self.config.batch):
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch))
            picked.append(self.calibration[int(order[offset])])
        return picked[rank::world]

    def _losses(self, gm, window: torch.Tensor, use_local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        activation_modules = [s.module for s in self.sites if s.what == "input"]
        target = None
        if self.config.loss == "kl":
            with torch.no_grad():
                self._set_enabled(False)
                target = F.log_softmax(logits_of(gm(window)).float(), -1)
                self._set_enabled(True)
        for module in activation_modules:
            module.record_error = use_local
        # stage by stage under activation checkpointing: backward recomputes one layer at a time
        # (LayerStream.forward); the quantizers keep `record_error` until backward is done, so the
        # recomputed forward is the one that ran
        logits = logits_of(self._stream.forward(window)).float()
        if target is None:
            task = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        else:
            log_q = F.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
            task = F.kl_div(log_q, target.reshape(-1, logits.shape[-1]), log_target=True, reduction="batchmean")
        local = torch.zeros(())
        if use_local:
            local = sum((m.last_error for m in activation_modules if m.last_error is not None), local)
        return task, local

    def _stop_recording(self) -> None:
        for site in self.sites:
            site.module.record_error, site.module.last_error = False, None

    def _set_enabled(self, enabled: bool) -> None:
        for site in self.sites:
            site.module.enabled = enabled

    def _optimizers(self, gm):
        """(scales and smoothing log-factors, rotations, their SGD (group 0 scales, group 1 smoothing), Cayley SGD)."""
        scales = [s.module.relative for s in self.sites if s.module.relative.requires_grad]
        rotations = [p for _, p in rotation_parameters(gm)] if self.config.lr_rotation > 0 else []
        smoothing = [p for _, p in smoothing_parameters(gm)] if self.config.learn_smoothing else []
        if self.config.learn_smoothing and not smoothing:
            raise QuantNpuError("stage one: learn_smoothing is set but the graph has no smoothing factors (run SmoothUnrotatedInputs first)")
        for p in rotations + smoothing:
            p.requires_grad_(True)
        groups = [{"params": scales, "lr": self.config.lr_scale}, {"params": smoothing, "lr": self.config.lr_smoothing}]
        scale_opt = torch.optim.SGD(groups, lr=self.config.lr_scale, momentum=self.config.momentum) if scales or smoothing else None
        rotation_opt = CayleySGD(rotations, lr=self.config.lr_rotation, momentum=self.config.momentum) if rotations else None
        return scales + smoothing, rotations, scale_opt, rotation_opt

    def _train(self, gm, checkpoint: dict | None) -> None:
        config = self.config
        rank, world = rank_and_world()
        scales, rotations, scale_opt, rotation_opt = self._optimizers(gm)
        trainable = scales + rotations
        if not trainable:
            raise QuantNpuError(f"stage one ({config.optimize}): nothing to learn (no rotation parameters and no learnable scale)")
        start = 0
        if checkpoint is not None:
            start = self._restore(gm, checkpoint, scale_opt, rotation_opt)
        if self.measure_float_step and self.float_step_seconds is None:
            self.float_step_seconds = self._float_step_seconds(gm, trainable)
        interrupt = _InterruptFlag()
        bar = tqdm(range(start, config.steps), desc="stage one", unit="step", initial=start, total=config.steps,
                   disable=not self.progress or rank)
        with interrupt:
            for step in bar:
                began = time.perf_counter()
                factor = 0.5 * (1 + math.cos(math.pi * step / config.steps))  # cosine decay
                if scale_opt is not None:
                    scale_opt.param_groups[0]["lr"] = config.lr_scale * factor
                    scale_opt.param_groups[1]["lr"] = config.lr_smoothing * factor
                if rotation_opt is not None:
                    rotation_opt.param_groups[0]["lr"] = config.lr_rotation * factor
                use_local = step < config.t_local and config.local_weight > 0
                totals = torch.zeros(2, dtype=torch.float64)
                for window in self._windows(step):
                    task, local = self._losses(gm, window, use_local)
                    ((task + config.local_weight * local) / config.batch).backward()
                    self._stop_recording()
                    totals += torch.tensor([float(task.detach()), float(local.detach())], dtype=torch.float64) / config.batch
                    release_freed_memory()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
                all_reduce_(grads + [totals])
                for p, g in zip(trainable, grads):
                    p.grad = g
                if scale_opt is not None:
                    scale_opt.step()
                if rotation_opt is not None:
                    rotation_opt.step()
                for site in self.sites:
                    site.module.clamp_()
                with torch.no_grad():
                    for _, p in smoothing_parameters(gm):
                        p.clamp_(-LOG_FACTOR_BOUND, LOG_FACTOR_BOUND)
                for p in trainable:
                    p.grad = None
                task_loss, local_loss = float(totals[0]), float(totals[1])
                self.history.append(StepRecord(step, task_loss + config.local_weight * local_loss, task_loss, local_loss,
                                               time.perf_counter() - began))
                bar.set_postfix(loss=f"{task_loss:.3f}", local=f"{local_loss:.2e}")
                done = step + 1
                if config.checkpoint and (done % config.checkpoint_every == 0 or done == config.steps or interrupt.set):
                    self._save_checkpoint(gm, done, scale_opt, rotation_opt)
                if interrupt.set and done < config.steps:
                    self.interrupted_at = done
                    where = f"checkpoint written to {config.checkpoint}; run the same command with --resume to continue" \
                        if config.checkpoint else "no checkpoint path was given, nothing was kept"
                    raise Interrupted(f"stage one interrupted after step {done} of {config.steps}: {where}")
        self._rotation_masters = rotation_opt.masters() if rotation_opt is not None else []

    def _float_step_seconds(self, gm, trainable) -> float:
        """The faster of two float forward+backward passes over step 0's windows (the first warms up)."""
        windows = self._windows(0)
        self._set_enabled(False)
        times = []
        try:
            for _ in range(2):
                began = time.perf_counter()
                for window in windows:
                    logits = logits_of(self._stream.forward(window)).float()
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
                    (loss / self.config.batch).backward()
                times.append(time.perf_counter() - began)
                for p in trainable:
                    p.grad = None
            seconds = min(times)
        finally:
            self._set_enabled(True)
            for p in trainable:
                p.grad = None
        return seconds

    # -- results ---------------------------------------------------------------------------------

    def _write_back(self, gm) -> None:
        for master, (name, p) in zip(self._rotation_masters, rotation_parameters(gm)):
            error = orthogonality_error(master)
            self.orthogonality = max(self.orthogonality, error)
            if not error < ORTHOGONALITY_TOLERANCE:
                raise GraphStructureError(f"learned rotation {name} is not orthogonal: ||R^T R - I|| = {error:.2e}")
            with torch.no_grad():
                p.copy_(master.to(p.dtype))
        if self.config.optimize == "rotations":
            return  # scales were not learned: stage two calibrates every encoding on the new rotations
        for site in self.sites:
            if site.what == "input" and site.module.dynamic:
                continue  # dynamic simulation: the static encoding comes from stage two
            field_name = "learned_input" if site.what == "input" else "learned_weight"
            encoding = site.module.encoding(note=f"stage one ({self.config.optimize})")
            for linear in site.linears:
                update_tensor_quant(linear, **{field_name: encoding})

    def summary(self) -> dict:
        """What a record or results file keeps of a run: the task loss per step and its mean over the
        first and the last pass of the calibration windows (one step's loss moves with its own window's
        difficulty, so first -> last step alone says little), seconds per step, final orthogonality."""
        if not self.history:
            return {"steps": 0}
        loss = [r.task_loss for r in self.history]
        per_pass = min(len(loss), max(1, -(-len(self.calibration) // self.config.batch)))
        return {"steps": len(loss), "seconds_per_step": round(sum(r.seconds for r in self.history) / len(loss), 3),
                "loss_first": loss[0], "loss_last": loss[-1], "loss_first_pass_mean": sum(loss[:per_pass]) / per_pass,
                "loss_last_pass_mean": sum(loss[-per_pass:]) / per_pass, "steps_per_pass": per_pass,
                "loss": [round(x, 5) for x in loss], "orthogonality": self.orthogonality}

    def report(self) -> str:
        if not self.history:
            return "stage one: not run"
        first, last = self.history[0], self.history[-1]
        seconds = sum(r.seconds for r in self.history) / len(self.history)
        learned = sum(1 for s in self.sites if s.module.relative.requires_grad)
        return (f"stage one ({self.config.optimize}): {len(self.history)} steps, loss {first.task_loss:.3f} -> {last.task_loss:.3f}, "
                f"{learned} of {len(self.sites)} quantizers learned, {seconds:.1f} s/step, ||R^T R - I|| <= {self.orthogonality:.1e}")

    # -- checkpoints -----------------------------------------------------------------------------

    def _fingerprint(self, gm) -> dict:
        return {"config": self.config.fingerprint(), "calibration": [tuple(b.shape) for b in self.calibration],
                "sites": [(s.name, s.bits) for s in self.sites], "rotations": [n for n, _ in rotation_parameters(gm)],
                "smoothing": [n for n, _ in smoothing_parameters(gm)]}

    def _save_checkpoint(self, gm, step: int, scale_opt, rotation_opt) -> None:
        if rank_and_world()[0] != 0:
            return
        state = {
            "version": CHECKPOINT_VERSION, "step": step, "fingerprint": self._fingerprint(gm),
            "initial_scales": {s.name: s.module.initial_scale.clone() for s in self.sites},
            "relative": {s.name: s.module.relative.detach().clone() for s in self.sites},
            "scale_optimizer": scale_opt.state_dict() if scale_opt is not None else None,
            "rotations": {name: {k: v.clone() for k, v in rotation_opt.state[p].items()} if rotation_opt is not None else {}
                          for name, p in rotation_parameters(gm)},
            "rotation_values": {name: p.detach().clone() for name, p in rotation_parameters(gm)},
            "smoothing_values": {name: p.detach().clone() for name, p in smoothing_parameters(gm)},
            "history": [dataclasses.asdict(r) for r in self.history],
        }
        with atomic_path(self.config.checkpoint) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self, gm) -> dict:
        path = Path(self.config.checkpoint)
        if not path.is_file():
            raise QuantNpuError(f"{path}: no stage-one checkpoint to resume from")
        try:
            state = torch.load(path, weights_only=True)
        except Exception as error:  # a damaged or foreign file
            raise QuantNpuError(f"{path}: not a readable stage-one checkpoint ({type(error).__name__})") from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise QuantNpuError(f"{path}: not a stage-one checkpoint of this version")
        expected = self._fingerprint(gm)
        for key, value in expected.items():
            if _jsonish(state["fingerprint"].get(key)) != _jsonish(value):
                raise QuantNpuError(f"{path}: written by a different stage-one run ({key} differs); "
                                    "resume with the same model, plan, calibration and settings, or drop --resume")
        return state

    def _restore(self, gm, state: dict, scale_opt, rotation_opt) -> int:
        with torch.no_grad():
            for site in self.sites:
                site.module.initial_scale.copy_(state["initial_scales"][site.name])
                site.module.relative.copy_(state["relative"][site.name])
            for name, p in smoothing_parameters(gm):
                p.copy_(state["smoothing_values"][name])
            for name, p in rotation_parameters(gm):
                p.copy_(state["rotation_values"][name])
                if rotation_opt is not None:
                    rotation_opt.state[p].update({k: v.clone() for k, v in state["rotations"][name].items()})
        if scale_opt is not None and state["scale_optimizer"] is not None:
            scale_opt.load_state_dict(state["scale_optimizer"])
        self.history = [StepRecord(**r) for r in state["history"]]
        return int(state["step"])


def _jsonish(value):
    """Tuples and lists compare alike (a checkpoint stores what it was given)."""
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    return value


class _InterruptFlag:
    """While active (main thread only), the first Ctrl-C sets `set` so the running step can finish
    and be checkpointed; a second one interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\nstage one: finishing this step, then writing a checkpoint (Ctrl-C again to stop at once)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


__all__ = ["INITS", "LOSSES", "SIMULATIONS", "LearnEncodings", "StageOneConfig", "QuantizerSite", "StepRecord", "stage_one_sites",
           "insert_stage_one_quantizers", "remove_stage_one_quantizers", "initialize_scales", "OPTIMIZE"]
