"""Before a long run: the model's size, and an estimate of the run's peak resident memory and time.

A stage's peak is a fixed base (the libraries) plus a multiple of the model's float weights; a stage's
seconds are a cost per decoder layer and per window it reads. Both come from one measured run, the
Gemma-3-270M record committed as bench/results/runs/gemma3-270m-s128-8-8-8.json (8-8-8, the shipped
recipe, 16 calibration and 2 evaluation windows of 128 tokens): on SmolLM2-135M's `make run` they give
peaks within ~6% (lower, evaluation) to ~35% above (passes) of what it measured, and seconds within
~10%. Until bench/scale.py's rows of the larger shapes are measured, this is a rough guide for them, and
it errs high where Gemma's 262k vocabulary inflates the per-weight cost. The estimate is printed before
the passes start; a run whose peak would not fit the memory this machine has stops there with one line
saying what it needs and what to change, instead of being killed by the kernel hours later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantnpu.errors import QuantNpuError

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class ModelSize:
    """What the program holds: parameters (each stored tensor counted once, tied ones once), their
    float bytes, and the shapes that set the per-window costs."""

    parameters: int
    weight_bytes: int
    vocab: int
    seq_len: int
    batch: int
    layers: int = 1

    def describe(self) -> str:
        return (f"{self.parameters / 1e6:,.1f}M parameters ({self.weight_bytes / GIB:.2f} GiB of weights), {self.layers} layers, "
                f"{self.vocab:,}-token vocabulary, windows of {self.batch} x {self.seq_len} tokens")


def model_size(gm: torch.nn.Module, vocab: int, batch: int, seq_len: int) -> ModelSize:
    """Count `gm`'s parameters and buffers, each storage once (a tied embedding and head is one tensor)."""
    import re

    seen: set[tuple[int, int]] = set()
    parameters = weight_bytes = 0
    state = gm.state_dict(keep_vars=True)
    layers = {m.group(1) for name in state if (m := re.search(r"layers[._](\d+)[._]", name))}
    tensors = list(state.values())
    tensors += [v for v in vars(gm).values() if isinstance(v, torch.Tensor)]  # lifted constants
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        parameters += tensor.numel()
        weight_bytes += tensor.numel() * tensor.element_size()
    return ModelSize(parameters, weight_bytes, vocab, seq_len, batch, max(len(layers), 1))


@dataclass(frozen=True)
class StageCost:
    """One stage: `peak_mib = BASE_MIB + weight_multiple * float weight MiB`, and
    `seconds = s_per_layer_window * layers * windows * tokens / 128` (windows: the stage's)."""

    weight_multiple: float
    s_per_layer_window: float
    windows: str  # "calibration", "evaluation" or "none" (once)


# From bench/results/runs/gemma3-270m-s128-8-8-8.json: resident after loading 1460.1 MiB with 1021 MiB of
# float weights (so ~439 MiB of libraries); each stage's (peak - base) / 1021 MiB; seconds / (18 layers x
# its windows: 16 calibration, 2 evaluation).
BASE_MIB = 439.0
_WEIGHT_MIB, _LAYERS = 1021.0, 18
STAGE_COSTS: dict[str, StageCost] = {
    "passes": StageCost((5538.9 - BASE_MIB) / _WEIGHT_MIB, 296.294 / (_LAYERS * 16), "calibration"),
    "lower": StageCost((7897.8 - BASE_MIB) / _WEIGHT_MIB, 189.289 / _LAYERS, "none"),
    # --decode lowers two graphs of the model's size, one after another (SmolLM2-135M: 453-512 s for
    # prefill + decode, ~270 s for the forward alone): twice the seconds, the same peak
    "lower prefill + decode": StageCost((7897.8 - BASE_MIB) / _WEIGHT_MIB, 2 * 189.289 / _LAYERS, "none"),
    "eval float": StageCost((2470.8 - BASE_MIB) / _WEIGHT_MIB, 3.005 / (_LAYERS * 2), "evaluation"),
    "eval fake-quant": StageCost((8103.1 - BASE_MIB) / _WEIGHT_MIB, 10.728 / (_LAYERS * 2), "evaluation"),
    "eval .pte": StageCost((7516.3 - BASE_MIB) / _WEIGHT_MIB, 91.827 / (_LAYERS * 2), "evaluation"),
}


@dataclass(frozen=True)
class RunEstimate:
    size: ModelSize
    peak_mib: dict[str, float]
    seconds: dict[str, float]
    available_mib: float | None = None

    @property
    def peak_stage(self) -> str:
        return max(self.peak_mib, key=self.peak_mib.get)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def line(self) -> str:
        minutes = self.total_seconds / 60
        took = f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"
        have = f" of the {self.available_mib / 1024:.1f} GiB available" if self.available_mib else ""
        return (f"model: {self.size.describe()}\n"
                f"estimate: peak ~{self.peak_mib[self.peak_stage] / 1024:.1f} GiB{have} (set by {self.peak_stage}), ~{took} "
                "(a rough guide, see quantnpu/estimate.py; the run record has the measured figures)")


def estimate_run(size: ModelSize, stages: list[str], calib_windows: int, eval_windows: int) -> RunEstimate:
    """The peak and seconds of each of `stages` (names of STAGE_COSTS) for a model of `size`."""
    weight_mib = size.weight_bytes / MIB
    tokens = size.batch * size.seq_len / 128
    windows = {"calibration": calib_windows * tokens, "evaluation": eval_windows * tokens, "none": 1.0}
    peak, seconds = {}, {}
    for name in stages:
        cost = STAGE_COSTS[name]
        peak[name] = BASE_MIB + cost.weight_multiple * weight_mib
        seconds[name] = cost.s_per_layer_window * size.layers * windows[cost.windows]
    return RunEstimate(size, peak, seconds, available_memory_mib())


def available_memory_mib() -> float | None:
    """What this process may still grow to: the memory the kernel counts as available plus what the
    process already holds (its weights are in the estimate); None where /proc/meminfo is not readable."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
    except (OSError, ValueError, IndexError):
        return None
    from quantnpu.memory import resident_mib

    return fields.get("MemAvailable", fields.get("MemFree", 0)) / 1024 + resident_mib()


def check_fits(estimate: RunEstimate, source: str) -> None:
    """A one-line QuantNpuError if the estimated peak exceeds the available memory, naming what brings the
    peak down: without --eval when an evaluation stage sets it; otherwise how much memory it needs, and
    --no-memory-check to try anyway."""
    available = estimate.available_mib
    if available is None:
        return
    peak = max(estimate.peak_mib.values())
    if peak <= available:
        return
    need = f"{source}: the run would need ~{peak / 1024:.1f} GiB (set by {estimate.peak_stage}) and this machine has {available / 1024:.1f} GiB available"
    without_eval = {k: v for k, v in estimate.peak_mib.items() if not k.startswith("eval ")}
    if estimate.peak_stage.startswith("eval ") and without_eval and max(without_eval.values()) <= available:
        raise QuantNpuError(f"{need}; without --eval it needs ~{max(without_eval.values()) / 1024:.1f} GiB "
                            "(evaluate the .pte later, or pass --no-memory-check to try anyway)")
    raise QuantNpuError(f"{need}; no option of this command brings it under that: use a machine with more memory, "
                        "or pass --no-memory-check to try anyway")
