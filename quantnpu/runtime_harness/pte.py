"""Run a `.pte` with ExecuTorch's Python runtime (QNN programs run on the x86 HTP simulator)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantnpu.errors import InputFileError
from quantnpu.lowering import qnn_sdk


class PteModel:
    """A loaded `.pte` method callable like a module: `PteModel(path)(input_ids) -> logits`."""

    def __init__(self, path: str | Path, method: str = "forward") -> None:
        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        qnn_sdk.activate()
        from executorch.runtime import Runtime

        runtime = Runtime.get()
        self.program = runtime.load_program(str(path))
        self.method = self.program.load_method(method)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.method.execute(list(inputs))[0]

    def outputs(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the method."""
        return list(self.method.execute(list(inputs)))
