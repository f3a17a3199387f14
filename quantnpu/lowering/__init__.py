"""Lowering to ExecuTorch's Qualcomm QNN backend, and the QNN libraries it needs here."""
