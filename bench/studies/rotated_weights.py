#!/usr/bin/env python3
"""Why Hadamard R1 can make 4-bit weights worse on SmolLM2-135M-Instruct: per-linear output error
of 4-bit per-output-channel weights on the linears that read an RMSNorm (q/k/v, gate/up), in the
graph as exported and after FoldNorms (+ R1).

The post-attention RMSNorm weight g is nearly zero on a few channels: unrotated, the linear reads
x * g and the weight's rounding noise on those channels is multiplied by ~0. FoldNorms moves g into
the weight (W diag(g)) and R1 mixes all channels, so the rounding noise, now spread evenly over the
rotated basis, meets those channels' full normalized activation. The fourth column tests that reading: the same rotated quantization with the suppressed
channels (g < 1% of its median) of the normalized input set to zero, which changes the layer's float
output by the amount in "masking changes float output".

Relative output error ||x Q(W)^T - x W^T|| / ||x W^T|| over calibration tokens, averaged over the
30 layers; Q: symmetric per-output-channel scales by Max-Min or by the mean-based rule (what the static
encodings of a rotated 4-bit weight start from, quantnpu.quantizers.init_rules). R1: a random Hadamard
of the hidden size (quantnpu.quantizers.hadamard.random_hadamard, as FuseRotations draws it).
Results: bench/studies/results/rotated_weights.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from quantnpu.fileio import atomic_write_text  # noqa: E402
from quantnpu.graph.meta import nodes_by_role  # noqa: E402
from quantnpu.models.corpus import split_tokens, token_windows  # noqa: E402
from quantnpu.models.export import export_causal_lm  # noqa: E402
from quantnpu.models.smollm2 import load_smollm2  # noqa: E402
from quantnpu.passes import PassManager  # noqa: E402
from quantnpu.passes.weights import weight_tensor  # noqa: E402
from quantnpu.pipeline import float_passes  # noqa: E402
from quantnpu.quantizers.encodings import Encoding  # noqa: E402
from quantnpu.quantizers.hadamard import random_hadamard  # noqa: E402
from quantnpu.quantizers.init_rules import TensorStats, max_min_scale, mean_based_scale  # noqa: E402
from quantnpu.runtime_harness.activation_stats import linear_inputs  # noqa: E402

NORM_OF = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
           "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
SUPPRESSED = 0.01  # a channel whose |g| is below this fraction of the median |g|
COLUMNS = ("exported, Max-Min", "folded + R1, Max-Min", "folded + R1, mean rule", "folded + R1, mean rule, suppressed masked",
           "masking changes float output")


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return Encoding(bits=bits, scale=tuple(scale.tolist()), axis=0).fake_quantize(weight)


def relative_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    reference = x @ weight.T
    return ((x @ quantized.T - reference).norm() / reference.norm()).item()


def linear_weights(gm: torch.fx.GraphModule, roles: set[str]) -> dict[str, torch.Tensor]:
    by_role = nodes_by_role(gm)
    return {role: weight_tensor(gm, by_role[role].args[1]).detach().double() for role in roles}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="R1's random signs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "studies" / "results" / "rotated_weights"))
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    layers = model.model.layers
    windows = token_windows(split_tokens(tokenizer, "calibration"), args.seq_len, args.calib_windows)
    graph = export_causal_lm(model, args.seq_len).module()
    roles = {f"layers.{i}.{kind}" for i in range(len(layers)) for kind in NORM_OF}
    exported = PassManager(float_passes("none")).run(copy.deepcopy(graph))
    folded = PassManager(float_passes("hadamard"), stop_after="FoldNorms").run(copy.deepcopy(graph))
    inputs = {"exported": linear_inputs(exported, windows, roles, "exported"), "folded": linear_inputs(folded, windows, roles, "folded")}
    weights = {"exported": linear_weights(exported, roles), "folded": linear_weights(folded, roles)}
    rotation = random_hadamard(inputs["folded"][next(iter(roles))].shape[-1], args.seed)

    rows = []
    for role in sorted(roles, key=lambda r: (int(r.split(".")[1]), r)):
        layer, kind = int(role.split(".")[1]), role.split(".")[2]
        gamma = getattr(layers[layer], NORM_OF[kind]).weight.detach().double().abs()
        suppressed = gamma < SUPPRESSED * gamma.median()
        x, w = inputs["exported"][role].double(), weights["exported"][role]
        normalized, w_folded = inputs["folded"][role].double(), weights["folded"][role]
        x_rotated, w_rotated = normalized @ rotation, w_folded @ rotation
        masked = normalized.masked_fill(suppressed, 0.0)
        stats = TensorStats.of(w_rotated, 0)
        mean_rule = fake_quant_weight(w_rotated, mean_based_scale(stats, args.bits), args.bits)
        errors = {
            COLUMNS[0]: relative_error(x, w, fake_quant_weight(w, max_min_scale(TensorStats.of(w, 0), args.bits), args.bits)),
            COLUMNS[1]: relative_error(x_rotated, w_rotated, fake_quant_weight(w_rotated, max_min_scale(stats, args.bits), args.bits)),
            COLUMNS[2]: relative_error(x_rotated, w_rotated, mean_rule),
            COLUMNS[3]: relative_error(masked @ rotation, w_rotated, mean_rule),
            COLUMNS[4]: ((masked - normalized) @ w_folded.T).norm().item() / (normalized @ w_folded.T).norm().item(),
        }
        rows.append({"role": role, "suppressed_channels": int(suppressed.sum()), **errors})

    kinds = list(NORM_OF)
    summary = {kind: {c: sum(r[c] for r in rows if r["role"].endswith(kind)) / sum(r["role"].endswith(kind) for r in rows) for c in COLUMNS}
               for kind in kinds}
    suppressed_by_norm = {norm: [r["suppressed_channels"] for r in rows if r["role"].endswith(kind)]
                          for norm, kind in (("input_layernorm", "q_proj"), ("post_attention_layernorm", "gate_proj"))}
    command = "python bench/studies/rotated_weights.py " + shlex.join(sys.argv[1:])
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"command": command, "setting": vars(args) | {"out": None}, "summary": summary,
                                                            "suppressed": suppressed_by_norm, "rows": rows}, indent=1) + "\n")
    lines = ["# Rotated 4-bit weights: where Hadamard R1 hurts (SmolLM2-135M-Instruct)", "", f"Command: `{command}`", "",
             f"{args.calib_windows} x {args.seq_len} Brown calibration tokens, W{args.bits} symmetric per output channel; relative output "
             f"error averaged over the {len(layers)} layers (see the script's docstring for each column).", "",
             "| linear (reads) | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for kind in kinds:
        lines.append(f"| {kind} ({NORM_OF[kind]}) | " + " | ".join(f"{summary[kind][c]:.4f}" for c in COLUMNS) + " |")
    lines += ["", f"Channels with |g| < {SUPPRESSED:.0%} of the median, per layer: "
              + "; ".join(f"{norm} {counts}" for norm, counts in suppressed_by_norm.items()), ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
