"""Quantizers: ExecuTorch's QnnQuantizer baselines (and, later, quantnpu's own fixed encodings)."""
