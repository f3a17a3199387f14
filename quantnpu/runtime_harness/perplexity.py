"""Perplexity over fixed token windows, for anything that maps input_ids to logits."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    tokens: int
    windows: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(
    forward: Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    desc: str = "ppl",
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean next-token NLL) over `windows [n, seq]`; each window is scored on its own
    (tokens 2..seq predicted from their prefix), so results do not depend on batching."""
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seq] tensor, got {tuple(windows.shape)}")
    total_nll, tokens = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
            logits = forward(window.unsqueeze(0))
            total_nll += F.cross_entropy(logits[0, :-1].double(), window[1:], reduction="sum").item()
            tokens += window.numel() - 1
    mean = total_nll / tokens
    return PerplexityResult(
        ppl=math.exp(mean), mean_nll=mean, tokens=tokens, windows=int(windows.shape[0]),
        seconds=time.perf_counter() - start,
    )


def eager_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of a Hugging Face causal LM run eagerly (no KV cache)."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits
