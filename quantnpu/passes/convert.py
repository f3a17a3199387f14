"""The passes that end the chain in a converted (Q/DQ) graph.

`ConvertToQdq`: from the calibrated fake-quant graph, PT2E `prepare_pt2e` + `convert_pt2e` with
`QuantNpuQuantizer`, so every quantize/dequantize op carries exactly the recorded encoding. The
encodings (an `EncodingTable`, the encodings JSON's content) are kept on the converted module's
`meta` (`ENCODINGS_META`), since the converted graph no longer has the nodes they were read from.

`QuantizeWithQnnQuantizer`: ExecuTorch's own `QnnQuantizer` configs (8a8w, 16a8w, ...) for
comparison: prepare, calibrate on the batches, convert.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx
from tqdm import tqdm

from quantnpu.passes.base import GraphPass, PassResult
from quantnpu.passes.round_weights import RoundWeightsGptq
from quantnpu.passes.static_calibration import StaticCalibration, encodings_by_tensor
from quantnpu.passes.weights import drop_unused_tensors

ENCODINGS_META = "quantnpu_encodings"


class ConvertToQdq(GraphPass):
    """The fake-quant graph in, the converted Q/DQ graph with the same encodings out."""

    run_after = (StaticCalibration, RoundWeightsGptq)
    preserves_function = False  # verification ends before quantization

    def __init__(self, soc: str = "SM8650") -> None:
        self.soc = soc

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from quantnpu.quantizers.quantnpu_quantizer import quantize_with_encodings

        table = encodings_by_tensor(gm)
        converted = quantize_with_encodings(gm, self.soc, in_place=True)  # the fake-quant graph is consumed
        # conversion leaves each float weight beside the quantized constant that replaced it: free it
        drop_unused_tensors(converted)
        converted.meta[ENCODINGS_META] = table
        return PassResult(converted, True)


class QuantizeWithQnnQuantizer(GraphPass):
    """ExecuTorch's `QnnQuantizer` with one of its configs (`quantizers/et_qnn.py`), calibrated on
    `batches`: the comparison baseline."""

    preserves_function = False

    def __init__(self, config: str, batches: Sequence[torch.Tensor], soc: str = "SM8650", progress: bool = False) -> None:
        self.config, self.batches, self.soc, self.progress = config, list(batches), soc, progress

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        from quantnpu.quantizers.et_qnn import make_et_quantizer

        prepared = prepare_pt2e(gm, make_et_quantizer(self.config, gm, self.soc))
        with torch.no_grad():
            for batch in tqdm(self.batches, desc="calibrate", unit="window", disable=not self.progress):
                prepared(batch)
        return PassResult(convert_pt2e(prepared), True)
