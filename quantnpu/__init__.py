"""quantnpu: Quant.npu fully static quantization as a torch.export graph compiler."""

__version__ = "0.1.0"
