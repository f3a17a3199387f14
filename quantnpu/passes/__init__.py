"""Graph passes: one module per pass, plus the pass manager (`base.py`)."""

from __future__ import annotations

from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.base import GraphPass, PassManager, PassRecord, PassResult
from quantnpu.passes.fold_constants import FoldConstants

__all__ = ["AnnotateRoles", "FoldConstants", "GraphPass", "PassManager", "PassRecord", "PassResult", "default_pipeline"]


def default_pipeline() -> list[GraphPass]:
    """The passes run before quantization, in order."""
    return [FoldConstants(), AnnotateRoles()]
