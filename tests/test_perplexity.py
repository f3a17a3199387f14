"""Perplexity arithmetic on forwards whose answer is known."""

import math

import pytest
import torch

from quantnpu.runtime_harness.perplexity import perplexity


def test_uniform_logits_give_the_vocabulary_size():
    vocab = 37
    result = perplexity(lambda ids: torch.zeros(1, ids.shape[1], vocab), torch.randint(0, vocab, (3, 9)), progress=False)
    assert result.ppl == pytest.approx(vocab)
    assert result.tokens == 3 * 8 and result.windows == 3


def test_a_forward_that_knows_the_next_token_gets_near_one():
    windows = torch.randint(0, 10, (2, 6))

    def oracle(ids):
        logits = torch.full((1, ids.shape[1], 10), -30.0)
        logits[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 30.0
        return logits

    assert perplexity(oracle, windows, progress=False).ppl == pytest.approx(1.0, abs=1e-6)


def test_mean_nll_is_the_log_of_ppl():
    result = perplexity(lambda ids: torch.randn(1, ids.shape[1], 11), torch.randint(0, 11, (2, 5)), progress=False)
    assert math.log(result.ppl) == pytest.approx(result.mean_nll)
