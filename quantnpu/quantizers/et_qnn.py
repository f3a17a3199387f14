"""ExecuTorch's own `QnnQuantizer` configurations: the baseline every quantnpu config must beat.

| name          | activations | linear weights                         |
|---------------|-------------|----------------------------------------|
| `8a8w`        | 8-bit       | 8-bit per-channel                      |
| `16a8w`       | 16-bit      | 8-bit per-channel                      |
| `16a4w`       | 16-bit      | 4-bit per-channel                      |
| `16a4w_block` | 16-bit      | 4-bit per-block (block of `block_size` input channels) |

Activation observers are ExecuTorch's defaults for each config (moving-average min/max). The
annotation transforms are ExecuTorch's, as quantnpu runs them (`qnn_annotation_transforms`): without
RMSNorm recomposition, which miscompiles a norm whose weight was folded away, and with `pow(x, 2)`
as `x * x`.
"""

from __future__ import annotations

import torch
import torch.fx

from quantnpu.errors import QuantNpuError

ET_CONFIGS = ("8a8w", "16a8w", "16a4w", "16a4w_block")


def make_et_quantizer(config: str, gm: torch.fx.GraphModule, soc: str = "SM8650", block_size: int = 32):
    """A configured ExecuTorch `QnnQuantizer` for `gm` (the block map names gm's linear nodes)."""
    from quantnpu.lowering import qnn_sdk
    from quantnpu.lowering.soc import soc_model

    # Before ExecuTorch's QNN code runs: without QNN_SDK_ROOT it tries to download an SDK.
    qnn_sdk.activate()
    from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype

    dtypes = {
        "8a8w": QuantDtype.use_8a8w, "16a8w": QuantDtype.use_16a8w,
        "16a4w": QuantDtype.use_16a4w, "16a4w_block": QuantDtype.use_16a4w_block,
    }
    if config not in dtypes:
        raise QuantNpuError(f"unknown quantization config {config!r}: choose one of {', '.join(ET_CONFIGS)}")
    from quantnpu.quantizers.quantnpu_quantizer import qnn_annotation_transforms

    quantizer = QnnQuantizer(soc_model=soc_model(soc))
    # ExecuTorch's own transforms minus RecomposeRmsNorm (it miscompiles weightless norms), pow -> mul
    quantizer.transform_for_annotation = lambda model: qnn_annotation_transforms(model, soc)
    quantizer.set_default_quant_config(dtypes[config], is_linear_per_channel=True, is_conv_per_channel=True)
    if config == "16a4w_block":
        blocks = {}
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.linear.default:
                blocks[node.name] = (1, block_size)
                blocks[node.args[1].name] = (1, block_size)
        quantizer.set_block_size_map(blocks)
    return quantizer
