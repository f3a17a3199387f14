"""quantnpu.memory: per-stage peak resident memory that survives nesting and resets."""

import numpy as np

from quantnpu.memory import peak_memory, process_peak_mib


def _touch(mib: int) -> np.ndarray:
    block = np.ones(mib * 2**20 // 8)  # written, so resident
    return block


def test_each_stage_sees_its_own_peak_and_the_enclosing_one_sees_all():
    with peak_memory() as outer:
        with peak_memory() as big:
            block = _touch(400)
            del block
        with peak_memory() as small:
            block = _touch(40)
            del block
    if small.per_stage:  # Linux: the kernel's mark was reset for each stage
        assert small.mib < big.mib - 300, (small.mib, big.mib)
    assert outer.mib >= big.mib >= 400
    assert process_peak_mib() >= outer.mib
