"""The whole chain as one ordered list of passes: float graph in, integer-only Q/DQ graph out.

    from quantnpu.pipeline import pipeline
    from quantnpu.passes import PassManager
    qdq = PassManager(pipeline("8-8-8", batches)).run(gm)       # the shipped recipe, as the CLI runs it
    qdq = PassManager(pipeline("8-8-8", batches, STATIC)).run(gm)  # R1/R2 + static encodings only

`lower_to_qnn` takes the result from there. The CLI, every bench script and other compilers call
this; nothing else assembles passes. What runs between the float passes and stage two is a `Recipe`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Recipe:
    """What the chain does besides the float passes and stage two, in one place: the CLI's defaults,
    `pipeline(...)` from Python and the benches all start from a `Recipe` (`SHIPPED` unless told).

    `bits`: the bit plan `W-A-KV` the CLI uses when none is given (`pipeline` takes the plan it is
    handed); `rotate`: R1/R2 (hadamard, random, none); `promote_fraction`: the share of layers whose
    down_proj input AssignBitWidths raises to 16 bits (0: none); `stage_one`: LearnEncodings' settings
    (None: no stage one); `smoothing`: SmoothUnrotatedInputs' (None: off); `weight_rounding`: nearest
    or gptq, for the weights of at most `gptq_bits` bits; `leading_split`: SplitLeadingTokens' (None: off).
    Change one field with `recipe.replace(...)`; `as_dict()` is what run records and bench rows store."""

    name: str = "custom"
    bits: str = "4-8-8"
    rotate: str = "hadamard"
    promote_fraction: float = 0.0
    stage_one: StageOneConfig | None = None
    smoothing: SmoothingConfig | None = None
    weight_rounding: str = "nearest"
    gptq_bits: int = 4
    leading_split: LeadingTokenSplit | None = None

    def __post_init__(self) -> None:
        if self.rotate not in ROTATIONS:
            raise QuantNpuError(f"unknown rotation {self.rotate!r}: choose one of {', '.join(ROTATIONS)}")
        if self.weight_rounding not in WEIGHT_ROUNDING:
            raise QuantNpuError(f"unknown weight rounding {self.weight_rounding!r}: choose one of {', '.join(WEIGHT_ROUNDING)}")
        if not 0.0 <= self.promote_fraction <= 1.0:
            raise QuantNpuError(f"promote_fraction must be between 0 and 1, got {self.promote_fraction}")
        if self.gptq_bits not in (4, 8):
            raise QuantNpuError(f"gptq_bits must be 4 or 8, got {self.gptq_bits}")
        BitPlan.parse(self.bits)  # a bad default plan fails where it is written
        # "off" modes are written as None, so that "is it on" has one spelling
        if self.smoothing is not None and self.smoothing.mode == "off":
            object.__setattr__(self, "smoothing", None)
        if self.leading_split is not None and self.leading_split.mode == "off":
            object.__setattr__(self, "leading_split", None)
        if self.stage_one is not None and self.stage_one.optimize == "none":
            object.__setattr__(self, "stage_one", None)
        if self.smoothing is not None and self.smoothing.mode == "learn" and self.stage_one is None:
            raise QuantNpuError("smoothing mode 'learn' learns the factors in stage one: give a stage-one config")

    def replace(self, **changes) -> Recipe:
        """This recipe with some fields changed: `custom` unless named, except for `bits` (the name says
        what runs, the bits at what width: `SHIPPED.replace(bits="8-8-8")` is still the shipped recipe)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise QuantNpuError(f"recipe has no field {', '.join(unknown)}: its fields are "
                                f"{', '.join(f.name for f in dataclasses.fields(self))}")
        if "name" not in changes and any(getattr(self, k) != v for k, v in changes.items() if k != "bits"):
            changes["name"] = "custom"
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The paper's method alone (stage one on the selective sites + 10% promotion), and the static chain
# (R1/R2 and Max-Min encodings, nothing learned): the baselines the benches compare against.
STATIC = Recipe(name="static")
PAPER = Recipe(name="paper", promote_fraction=0.1, stage_one=StageOneConfig())
# What `tools/lower.py` and `pipeline(plan, calibration)` do unless told otherwise: the paper's method
# plus smoothing (search), GPTQ rounding of the 4-bit weights and the leading-token split.
# bench/results/table1.md measures it against the others.
SHIPPED = Recipe(name="shipped", promote_fraction=0.1, stage_one=StageOneConfig(),
                 smoothing=SmoothingConfig(mode="search"), weight_rounding="gptq",
                 leading_split=LeadingTokenSplit(mode="auto"))
RECIPES = {recipe.name: recipe for recipe in (SHIPPED, PAPER, STATIC)}


def pipeline(
    plan: BitPlan | str | None = None,
    calibration: Sequence[torch.Tensor] = (),
    recipe: Recipe = SHIPPED,
    *,
    soc: str = "SM8650",
    seed: int = 0,
    strict: bool = False,
    progress: bool = False,
    **changes,
) -> list[GraphPass]:
    """The whole chain in order. `plan`: a quantnpu `BitPlan` (or its `W-A-KV` text) for static
    encodings, ending in `ConvertToQdq` and `IntegerOnlyCheck`; `"et-<config>"` for ExecuTorch's
    QnnQuantizer instead (the recipe's rotation only); None for the float passes alone.
    `recipe` (default `SHIPPED`, what the CLI does) says what runs between them; keyword `changes`
    replace its fields (`pipeline("8-8-8", batches, rotate="none")` is `SHIPPED.replace(rotate="none")`).

    With the recipe's parts on: `smoothing` adds SmoothUnrotatedInputs right after the rotations are
    fused (sensitivity and stage one see the smoothed graph); `promote_fraction` > 0 adds
    AssignBitWidths; `stage_one` adds LearnEncodings before the rotations are baked (stage two keeps
    its encodings and calibrates the rest); `leading_split` adds SplitLeadingTokens on the baked float
    graph; `weight_rounding="gptq"` adds RoundWeightsGptq after stage two."""
    if changes:
        recipe = recipe.replace(**changes)
    passes = float_passes(recipe.rotate, seed, strict)
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
    split = recipe.leading_split
    skip = split.tokens if split is not None else 0
    stage_one = recipe.stage_one
    if recipe.smoothing is not None:
        learned.append(SmoothUnrotatedInputs(calibration, dataclasses.replace(recipe.smoothing, skip_leading=skip), plan, progress))
        if recipe.smoothing.mode == "learn":
            stage_one = dataclasses.replace(stage_one, learn_smoothing=True)
    if recipe.promote_fraction > 0:
        learned.append(AssignBitWidths(calibration, recipe.promote_fraction, progress=progress, skip_leading=skip))
    if stage_one is not None:
        learned.append(LearnEncodings(plan, calibration, stage_one, progress))
    bake = next((i for i, p in enumerate(passes) if isinstance(p, BakeRotations)), None)
    if bake is None:  # no rotations: the smoothing factors still need folding
        bake = len(passes)
        passes.append(BakeRotations())
    passes[bake:bake] = learned
    if split is not None:
        passes.append(SplitLeadingTokens(calibration, split, progress))
    return (passes + fake_quant_passes(plan, calibration, soc, progress, weight_rounding=recipe.weight_rounding,
                                       gptq_bits=recipe.gptq_bits)
            + [ConvertToQdq(soc), IntegerOnlyCheck()])


def find_pass(passes: Sequence[GraphPass], kind: type[GraphPass]) -> GraphPass | None:
    """The pass of type `kind` in a pipeline (to read what it recorded, e.g. legalization deviations)."""
    return next((p for p in passes if isinstance(p, kind)), None)
