"""The estimate printed before a long run, and the refusal of a run that would not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantnpu.errors import QuantNpuError
import json
from pathlib import Path

from quantnpu.estimate import BASE_MIB, MIB, STAGE_COSTS, ModelSize, check_fits, estimate_run, model_size


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # one tensor, counted once
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))  # not a weight


def test_model_size_counts_each_tensor_once_and_only_floating_point_ones():
    size = model_size(Tied(), vocab=10, batch=1, seq_len=8)
    assert size.layers == 1
    assert size.parameters == 10 * 4 + 4 * 4 + 4
    assert size.weight_bytes == 4 * size.parameters
    assert "vocabulary" in size.describe()


def _size(mparams: float) -> ModelSize:
    return ModelSize(int(mparams * 1e6), int(mparams * 4e6), vocab=49152, seq_len=128, batch=1, layers=24)


def test_estimate_follows_the_fitted_lines_and_the_windows():
    stages = ["passes", "lower", "eval float", "eval fake-quant", "eval .pte"]
    small, large = estimate_run(_size(135), stages, 16, 1), estimate_run(_size(1700), stages, 16, 1)
    for name in stages:
        cost = STAGE_COSTS[name]
        assert small.peak_mib[name] == pytest.approx(BASE_MIB + cost.weight_multiple * 135 * 4e6 / MIB)
        assert large.peak_mib[name] > small.peak_mib[name]
    twice = estimate_run(_size(135), stages, 32, 2)
    assert twice.seconds["passes"] == pytest.approx(2 * small.seconds["passes"])
    assert twice.seconds["eval .pte"] == pytest.approx(2 * small.seconds["eval .pte"])
    assert twice.seconds["lower"] == pytest.approx(small.seconds["lower"])
    assert large.seconds["lower"] == pytest.approx(small.seconds["lower"])  # per layer: same layer count
    assert "set by" in small.line()


def test_a_run_that_does_not_fit_stops_with_one_line_naming_what_to_change():
    stages = ["passes", "lower", "eval float", "eval fake-quant", "eval .pte"]
    guess = estimate_run(_size(1700), stages, 16, 1)
    peak = max(guess.peak_mib.values())
    check_fits(dataclasses.replace(guess, available_mib=peak + 1), "model.pt2")  # fits: nothing raised
    with pytest.raises(QuantNpuError) as error:
        check_fits(dataclasses.replace(guess, available_mib=peak / 4), "model.pt2")
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.pt2: ") and "--no-memory-check" in message
    # where an evaluation stage sets the peak and the rest fits, dropping --eval is the way out
    evals = dict(guess.peak_mib, **{"eval fake-quant": peak * 2})
    by_eval = dataclasses.replace(guess, peak_mib=evals, available_mib=peak + 1)
    with pytest.raises(QuantNpuError, match="without --eval"):
        check_fits(by_eval, "model.pt2")
    check_fits(dataclasses.replace(guess, available_mib=None), "model.pt2")  # unknown: no refusal


def test_the_estimate_reproduces_the_run_it_was_derived_from():
    """The committed Gemma-3-270M record: the estimate from its size gives back its own stage figures."""
    record = json.loads((Path(__file__).parent.parent / "bench/results/runs/gemma3-270m-s128-8-8-8.json").read_text())
    size = ModelSize(268_098_176, int(1021.0 * MIB), vocab=262144, seq_len=record["seq_len"], batch=1, layers=18)
    stages = ["passes", "lower", "eval float", "eval fake-quant", "eval .pte"]
    guess = estimate_run(size, stages, record["calibration"]["windows"], record["evaluation"]["windows"])
    for name in stages:
        assert guess.peak_mib[name] == pytest.approx(record["stage_peak_memory_mib"][name], rel=1e-3)
        assert guess.seconds[name] == pytest.approx(record["seconds"][name], rel=1e-3)
