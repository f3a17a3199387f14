"""Quantization numerics and the PT2E quantizers: encodings and their file, the bit plan, the
initialization rules, statistics observers, Hadamard/orthogonal matrices, quantnpu's own
`QuantNpuQuantizer` and ExecuTorch's QnnQuantizer configurations (the baselines)."""
