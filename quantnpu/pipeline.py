"""The whole chain as one ordered list of passes: float graph in, integer-only Q/DQ graph out.

    from quantnpu.pipeline import pipeline
    from quantnpu.passes import PassManager
    qdq = PassManager(pipeline(plan=BitPlan.parse("8-8-8"), calibration=batches)).run(gm)

`lower_to_qnn` takes the result from there. The CLI, every bench script and other compilers call
this; nothing else assembles passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from quantnpu.errors import QuantNpuError
from quantnpu.passes import (
    AnnotateRoles, BakeRotations, Canonicalize, FoldConstants, FoldNorms, FuseRotations, GraphPass, InsertStaticObservers,
    PlanBitWidths, PrepareForQnn, RemoveOnlineRotations, StaticCalibration, UntieEmbeddings,
)
from quantnpu.passes.assign_bit_widths import AssignBitWidths
from quantnpu.passes.convert import ConvertToQdq, QuantizeWithQnnQuantizer
from quantnpu.passes.integer_only import IntegerOnlyCheck
from quantnpu.passes.learn_encodings import LearnEncodings, StageOneConfig
from quantnpu.passes.round_weights import WEIGHT_ROUNDING, RoundWeightsGptq
from quantnpu.passes.smooth_inputs import SmoothingConfig, SmoothUnrotatedInputs
from quantnpu.passes.split_leading_tokens import LeadingTokenSplit, SplitLeadingTokens
from quantnpu.quantizers.bit_plan import BitPlan

ROTATIONS = ("none", "hadamard", "random")


def float_passes(rotate: str = "hadamard", seed: int = 0, strict: bool = False) -> list[GraphPass]:
    """The function-preserving front of the chain: canonicalize, recognize, remove online
    rotations, and (unless `rotate == "none"`) fold norms and fuse + bake R1/R2. `rotate` picks
    random Hadamard or random orthogonal (QR) matrices; `strict`: no QR fallback for a size
    without a Hadamard construction."""
    if rotate not in ROTATIONS:
        raise QuantNpuError(f"unknown rotation {rotate!r}: choose one of {', '.join(ROTATIONS)}")
    passes: list[GraphPass] = [Canonicalize(), FoldConstants(), AnnotateRoles(), RemoveOnlineRotations()]
    if rotate != "none":
        passes += [UntieEmbeddings(), FoldNorms(), FuseRotations(kind=rotate, seed=seed, strict=strict), BakeRotations()]
    return passes


def fake_quant_passes(plan: BitPlan, calibration: Sequence[torch.Tensor], soc: str = "SM8650",
                      progress: bool = False, legalize: bool = True, weight_rounding: str = "nearest",
                      gptq_bits: int = 4) -> list[GraphPass]:
    """Float graph -> fake-quant graph (stage two): PrepareForQnn, InsertStaticObservers,
    PlanBitWidths(plan), StaticCalibration(calibration), and with `weight_rounding="gptq"`
    RoundWeightsGptq on the weights of at most `gptq_bits` bits."""
    if weight_rounding not in WEIGHT_ROUNDING:
        raise QuantNpuError(f"unknown weight rounding {weight_rounding!r}: choose one of {', '.join(WEIGHT_ROUNDING)}")
    passes = [PrepareForQnn(), InsertStaticObservers(soc), PlanBitWidths(plan, legalize), StaticCalibration(calibration, progress, soc)]
    if weight_rounding == "gptq":
        passes.append(RoundWeightsGptq(calibration, max_bits=gptq_bits, progress=progress))
    return passes


def fake_quant_end(passes: Sequence[GraphPass]) -> str:
    """The name of the pass whose output is the finished fake-quant graph (a `stop_after` for it)."""
    ends = [p for p in passes if isinstance(p, (StaticCalibration, RoundWeightsGptq))]
    if not ends:
        raise QuantNpuError("this pipeline has no static encodings (no StaticCalibration)")
    return ends[-1].name


def pipeline(
    plan: BitPlan | str | None = None,
    calibration: Sequence[torch.Tensor] = (),
    rotate: str = "hadamard",
    soc: str = "SM8650",
    seed: int = 0,
    strict: bool = False,
    progress: bool = False,
    promote_fraction: float = 0.0,
    stage_one: StageOneConfig | None = None,
    smoothing: SmoothingConfig | None = None,
    weight_rounding: str = "nearest",
    gptq_bits: int = 4,
    leading_split: LeadingTokenSplit | None = None,
) -> list[GraphPass]:
    """The whole chain in order. `plan`: a quantnpu `BitPlan` (or its `W-A-KV` text) for static
    encodings, ending in `ConvertToQdq` and `IntegerOnlyCheck`; `"et-<config>"` for ExecuTorch's
    QnnQuantizer instead; None for the float passes alone. `promote_fraction` > 0 adds
    `AssignBitWidths`: the most sensitive down_proj inputs (that fraction of the layers) at 16 bits.
    `stage_one` adds `LearnEncodings` (scales learned with R1/R2) before the rotations are baked;
    stage two (`StaticCalibration`) then keeps its encodings and calibrates the rest.
    `smoothing` (mode other than off) adds `SmoothUnrotatedInputs` right after the rotations are
    fused: before sensitivity and stage one, which see the smoothed graph. `weight_rounding="gptq"`
    rounds the weights of at most `gptq_bits` bits with GPTQ after stage two. `leading_split`
    (mode other than off) adds `SplitLeadingTokens` on the baked float graph: the MLPs whose first
    tokens carry outsized values get a separate 16-bit path for those tokens."""
    passes = float_passes(rotate, seed, strict)
    if plan is None:
        return passes
    if isinstance(plan, str) and plan.startswith("et-"):
        return passes + [QuantizeWithQnnQuantizer(plan.removeprefix("et-"), calibration, soc, progress)]
    if isinstance(plan, str):
        plan = BitPlan.parse(plan)
    if not calibration:
        raise QuantNpuError("static encodings need calibration batches")
    # Sensitivity and stage one see the graph with R1/R2 still parameters (before BakeRotations).
    learned: list[GraphPass] = []
    # with the leading-token split, the MLP statistics that choose smoothing factors and promotions
    # leave out the positions that get their own 16-bit copy
    skip = leading_split.tokens if leading_split is not None and leading_split.mode != "off" else 0
    if smoothing is not None and smoothing.mode != "off":
        learned.append(SmoothUnrotatedInputs(calibration, dataclasses.replace(smoothing, skip_leading=skip), plan, progress))
    if promote_fraction > 0:
        learned.append(AssignBitWidths(calibration, promote_fraction, progress=progress, skip_leading=skip))
    if smoothing is not None and smoothing.mode == "learn":
        if stage_one is None or stage_one.optimize == "none":
            raise QuantNpuError("smoothing mode 'learn' learns the factors in stage one: give a stage-one config")
        stage_one = dataclasses.replace(stage_one, learn_smoothing=True)
    if stage_one is not None and stage_one.optimize != "none":
        learned.append(LearnEncodings(plan, calibration, stage_one, progress))
    bake = next((i for i, p in enumerate(passes) if isinstance(p, BakeRotations)), None)
    if bake is None:  # no rotations: the smoothing factors still need folding
        bake = len(passes)
        passes.append(BakeRotations())
    passes[bake:bake] = learned
    if leading_split is not None and leading_split.mode != "off":
        passes.append(SplitLeadingTokens(calibration, leading_split, progress))
    return (passes + fake_quant_passes(plan, calibration, soc, progress, weight_rounding=weight_rounding, gptq_bits=gptq_bits)
            + [ConvertToQdq(soc), IntegerOnlyCheck()])


def find_pass(passes: Sequence[GraphPass], kind: type[GraphPass]) -> GraphPass | None:
    """The pass of type `kind` in a pipeline (to read what it recorded, e.g. legalization deviations)."""
    return next((p for p in passes if isinstance(p, kind)), None)
