"""Run as a script: lower a 2-linear 8a8w model with or without the QNN ABI bridge.

`python -m tests.qnn_probe bridge|plain` exits 0 and prints LOWERED when lowering and running on
the HTP simulator work, else exits 1 with the backend's log on its output. A separate process
per variant, because QNN libraries cannot be unloaded from a process.
"""

import sys
import tempfile
from pathlib import Path

import torch


class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def main(variant: str) -> int:
    from quantnpu.lowering import qnn_sdk
    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.passes import PassManager
    from quantnpu.passes.convert import QuantizeWithQnnQuantizer
    from quantnpu.runtime_harness.pte import PteModel

    qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk(bridge=(variant == "bridge")))
    torch.manual_seed(0)
    x = torch.randn(1, 16)
    gm = torch.export.export(TwoLinear().eval(), (x,)).module()
    calibration = [torch.randn(1, 16) for _ in range(8)]
    quantized = PassManager([QuantizeWithQnnQuantizer("8a8w", calibration)], verify=False).run(gm)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = lower_to_qnn(quantized, (x,), Path(tmp) / "two_linear.pte")
        except RuntimeError as error:
            print(f"FAILED: {error}", flush=True)
            return 1
        out = PteModel(result.pte_path)(x)
    expected = quantized(x)
    error = ((out - expected).norm() / expected.norm()).item()
    print(f"LOWERED delegates={result.delegates} relative_error={error:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
