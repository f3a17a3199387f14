"""Names of the parameters that exist only until BakeRotations folds them into the weights:
R1 and each R2 (FuseRotations), and the smoothing log-factors (SmoothUnrotatedInputs)."""

from __future__ import annotations

R1_NAME = "quantnpu_R1"
R2_PREFIX = "quantnpu_R2_"
SMOOTH_PREFIX = "quantnpu_S_"


def is_rotation_target(target: str) -> bool:
    return target == R1_NAME or str(target).startswith(R2_PREFIX)


def is_smoothing_target(target: str) -> bool:
    return str(target).startswith(SMOOTH_PREFIX)


def is_folded_target(target: str) -> bool:
    """A parameter that weight expressions read until BakeRotations folds it."""
    return is_rotation_target(target) or is_smoothing_target(target)
