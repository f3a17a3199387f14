"""Qualcomm SoC names, as ExecuTorch's QNN backend knows them."""

from __future__ import annotations

from quantnpu.errors import QuantNpuError


def soc_names() -> list[str]:
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset

    return [chip.name for chip in QcomChipset if chip.name != "UNKNOWN_SM"]


def soc_model(name: str):
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset

    if name not in soc_names():
        raise QuantNpuError(f"unknown SoC {name!r}: choose one of {', '.join(soc_names())}")
    return QcomChipset[name]
