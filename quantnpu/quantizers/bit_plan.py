"""The bit plan: how many bits each tensor, and each edge into a linear, gets (METHOD.md, "Target").

A config `W-A-KV` (8-8-8, 4-8-8, 4-4-8) sets linear weights W, linear input activations A and the
attention K/V tensors. Tensors are named by labels that say what makes or reads them:
`layers.3.q_proj.weight`, `layers.3.q_proj.output`, `layers.3.key`, `layers.3.value`,
`embedding.table`; the edge into a linear is `layers.3.q_proj.input`.

| what                          | bits                                                     |
|-------------------------------|----------------------------------------------------------|
| `*.weight`                    | W per output channel; lm_head 8                          |
| `*.key`, `*.value` tensors    | KV                                                       |
| `*.output` tensors            | 8; gate_proj and lm_head outputs 16                      |
| any other tensor              | 16 (norms, SiLU, elementwise mul/add, softmax, RoPE, residual adds) |
| edge `lm_head.input`          | 16                                                       |
| edge `*.down_proj.input`      | 8 (16 by override or by sensitivity, Sec. 4.4)           |
| other edges `*.input`         | A if the input is rotated, else max(A, 8)                |

The leading-token copy of an MLP (SplitLeadingTokens; roles `layers.3.down_proj@leading`) follows
the same rules as the tensors it copies, with encodings of its own. Overrides match both its own
labels and the copied ones: `*.down_proj.input=16` covers both copies, `*@leading.*=16` only it.

An edge into a linear re-quantizes the tensor it reads (e.g. a 16-bit norm output read at A bits).
Overrides (`pattern=bits`, fnmatch over labels and graph node names; the last matching one wins)
come after the rules; one that puts an unrotated tensor below 8 bits is allowed, and the
initialization warns with the rule quoted.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from quantnpu.errors import QuantNpuError

ALLOWED_BITS = (4, 8, 16)
LEADING_TAG = "@leading"  # role suffix of an MLP's leading-token copy (passes/split_leading_tokens.py)
_CONFIG = re.compile(r"^(\d+)-(\d+)-(\d+)$")


@dataclass(frozen=True)
class BitPlan:
    weights: int = 4
    activations: int = 8
    kv: int = 8
    overrides: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for name, bits in (("W", self.weights), ("A", self.activations), ("KV", self.kv)):
            if bits not in ALLOWED_BITS:
                raise QuantNpuError(f"bit plan: {name} must be one of {ALLOWED_BITS}, got {bits}")
        for pattern, bits in self.overrides:
            if bits not in ALLOWED_BITS:
                raise QuantNpuError(f"bit plan override {pattern}={bits}: bits must be one of {ALLOWED_BITS}")

    @staticmethod
    def parse(config: str, overrides: Iterable[str] = ()) -> BitPlan:
        """`W-A-KV` plus overrides written `pattern=bits`."""
        match = _CONFIG.match(config.strip())
        if not match:
            raise QuantNpuError(f"bit plan {config!r}: write it W-A-KV, e.g. 4-8-8")
        parsed = []
        for text in overrides:
            pattern, sep, bits = text.rpartition("=")
            if not sep or not pattern or not bits.strip().isdigit():
                raise QuantNpuError(f"bit plan override {text!r}: write it pattern=bits, e.g. '*.down_proj.input=16'")
            parsed.append((pattern.strip(), int(bits)))
        weights, activations, kv = (int(g) for g in match.groups())
        return BitPlan(weights, activations, kv, tuple(parsed))

    @property
    def name(self) -> str:
        text = f"{self.weights}-{self.activations}-{self.kv}"
        return text + "".join(f" {p}={b}" for p, b in self.overrides)

    @staticmethod
    def _untagged(labels: Iterable[str]) -> list[str]:
        return [label.replace(LEADING_TAG + ".", ".") for label in labels]

    def _override(self, bits: int, why: str, names: Iterable[str]) -> tuple[int, str]:
        names = list(names)
        for pattern, override in self.overrides:
            if any(fnmatch.fnmatchcase(text, pattern) for text in names):
                bits, why = override, f"override {pattern}={override}"
        return bits, why

    def tensor_bits(self, labels: Iterable[str], names: Iterable[str] = ()) -> tuple[int, str]:
        """(bits, why) for a tensor with these labels (and graph node names)."""
        tagged = sorted(labels)
        labels = self._untagged(tagged)

        def has(suffix: str) -> list[str]:
            return [label for label in labels if label.endswith(suffix)]

        if weights := has(".weight"):
            bits, why = (8, "lm_head weight") if any(w.startswith("lm_head") for w in weights) else (self.weights, "W")
        elif has(".key") or has(".value"):
            bits, why = self.kv, "KV"
        elif outputs := has(".output"):
            if any(o.endswith(("gate_proj.output", "lm_head.output")) for o in outputs):
                bits, why = 16, "gate_proj/lm_head output"
            else:
                bits, why = 8, "linear output"
        else:
            bits, why = 16, "default 16"
        return self._override(bits, why, (*tagged, *labels, *names))

    def input_bits(self, linear_role: str, rotated: bool, promoted: tuple[int, str] | None = None) -> tuple[int, str]:
        """(bits, why) for the edge into a linear (its input activation). `promoted`: (bits, why)
        from sensitivity-based mixed precision, which replaces the rule; overrides still win."""
        tagged, linear_role = linear_role, linear_role.removesuffix(LEADING_TAG)
        if promoted is not None:
            bits, why = promoted
        elif linear_role == "lm_head":
            bits, why = 16, "lm_head input"
        elif linear_role.endswith("down_proj"):
            bits, why = 8, "down_proj input"
        elif rotated:
            bits, why = self.activations, "A (rotated)"
        else:
            bits, why = max(self.activations, 8), "A, unrotated: at least 8"
        return self._override(bits, why, (f"{tagged}.input", f"{linear_role}.input"))
