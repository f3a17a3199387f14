"""Graph passes: one module per pass, plus the pass manager (`base.py`)."""

from __future__ import annotations

from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.assign_bit_widths import AssignBitWidths
from quantnpu.passes.bake_rotations import BakeRotations
from quantnpu.passes.canonicalize import Canonicalize
from quantnpu.passes.base import GraphPass, PassManager, PassRecord, PassResult
from quantnpu.passes.fold_constants import FoldConstants
from quantnpu.passes.fold_norms import FoldNorms
from quantnpu.passes.fuse_rotations import FuseRotations
from quantnpu.passes.online_rotations import InsertOnlineRotations, RemoveOnlineRotations
from quantnpu.passes.prepare_for_qnn import PrepareForQnn
from quantnpu.passes.smooth_inputs import SmoothingConfig, SmoothUnrotatedInputs
from quantnpu.passes.split_leading_tokens import LeadingTokenSplit, SplitLeadingTokens
from quantnpu.passes.insert_observers import InsertStaticObservers
from quantnpu.passes.plan_bit_widths import BitDeviation, PlanBitWidths
from quantnpu.passes.static_calibration import StaticCalibration
from quantnpu.passes.untie_embeddings import UntieEmbeddings

__all__ = [
    "AnnotateRoles", "AssignBitWidths", "BakeRotations", "BitDeviation", "Canonicalize", "FoldConstants", "FoldNorms", "FuseRotations", "GraphPass",
    "InsertOnlineRotations", "InsertStaticObservers", "LeadingTokenSplit", "PassManager", "PassRecord", "PassResult", "PlanBitWidths", "PrepareForQnn",
    "RemoveOnlineRotations", "SmoothingConfig", "SmoothUnrotatedInputs", "SplitLeadingTokens", "StaticCalibration", "UntieEmbeddings",
]


