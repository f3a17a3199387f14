"""Graph passes: one module per pass, plus the pass manager (`base.py`)."""

from __future__ import annotations

from quantnpu.errors import QuantNpuError
from quantnpu.passes.annotate_roles import AnnotateRoles
from quantnpu.passes.bake_rotations import BakeRotations
from quantnpu.passes.canonicalize import Canonicalize
from quantnpu.passes.base import GraphPass, PassManager, PassRecord, PassResult
from quantnpu.passes.fold_constants import FoldConstants
from quantnpu.passes.fold_norms import FoldNorms
from quantnpu.passes.fuse_rotations import FuseRotations
from quantnpu.passes.online_rotations import InsertOnlineRotations, RemoveOnlineRotations
from quantnpu.passes.prepare_for_qnn import PrepareForQnn
from quantnpu.passes.static_observers import InsertStaticObservers, StaticCalibration
from quantnpu.passes.untie_embeddings import UntieEmbeddings

__all__ = [
    "AnnotateRoles", "BakeRotations", "Canonicalize", "FoldConstants", "FoldNorms", "FuseRotations", "GraphPass",
    "InsertOnlineRotations", "InsertStaticObservers", "PassManager", "PassRecord", "PassResult", "PrepareForQnn",
    "RemoveOnlineRotations", "StaticCalibration", "UntieEmbeddings", "default_pipeline", "static_quantization_passes",
]

ROTATIONS = ("none", "hadamard", "random")


def default_pipeline(rotate: str = "hadamard", seed: int = 0, strict: bool = False) -> list[GraphPass]:
    """The passes run before quantization, in order. `rotate` picks R1/R2: random Hadamard,
    random orthogonal (QR), or none (online rotations are removed in every case). `strict`: no QR
    fallback for a size without a Hadamard construction."""
    if rotate not in ROTATIONS:
        raise QuantNpuError(f"unknown rotation {rotate!r}: choose one of {', '.join(ROTATIONS)}")
    passes: list[GraphPass] = [Canonicalize(), FoldConstants(), AnnotateRoles(), RemoveOnlineRotations()]
    if rotate != "none":
        passes += [UntieEmbeddings(), FoldNorms(), FuseRotations(kind=rotate, seed=seed, strict=strict), BakeRotations()]
    return passes


def static_quantization_passes(plan, batches, soc: str = "SM8650", progress: bool = False, legalize: bool = True) -> list[GraphPass]:
    """The passes after `default_pipeline` that make the fake-quant graph (stage two only):
    PrepareForQnn, InsertStaticObservers(plan), StaticCalibration(batches)."""
    return [PrepareForQnn(), InsertStaticObservers(plan, soc, legalize), StaticCalibration(batches, progress, soc)]
