"""The Brown corpus: tags stripped, a deterministic split without overlap, fixed windows."""

import pytest
import torch

from quantnpu.errors import QuantNpuError
from quantnpu.models.corpus import brown_documents, brown_split, detag, token_windows


def test_detag_strips_tags_and_joins_punctuation():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( it/pps )/) ./.\n"
    assert detag(raw) == 'The jury said " no evidence ", (it) .'.replace(" .", ".")


def test_documents_are_the_500_brown_texts_without_tags():
    documents = brown_documents()
    assert len(documents) == 500
    assert documents[0][0] == "ca01" and documents[-1][0] == "cr09"
    assert documents[0][1].startswith("The Fulton County Grand Jury said Friday an investigation")
    assert "/at " not in documents[0][1] and "/nn" not in documents[0][1]


def test_split_is_deterministic_disjoint_and_about_ten_percent():
    first, second = brown_split(), brown_split()
    assert first == second
    assert not set(first.calibration_ids) & set(first.evaluation_ids)
    assert len(first.calibration_ids) + len(first.evaluation_ids) == 500
    share = len(first.evaluation_text) / (len(first.evaluation_text) + len(first.calibration_text))
    assert 0.10 <= share < 0.11
    assert first.evaluation_ids[-1] == "cr09"


def test_windows_are_consecutive_and_non_overlapping():
    tokens = torch.arange(100)
    windows = token_windows(tokens, 16, 3)
    assert windows.shape == (3, 16)
    assert torch.equal(windows.flatten(), torch.arange(48))
    assert token_windows(tokens, 16).shape == (6, 16)
    with pytest.raises(QuantNpuError, match="asked for 7 windows of 16 tokens, the split has 6"):
        token_windows(tokens, 16, 7)


def test_windows_start_with_the_tokenizers_special_prefix():
    """A tokenizer that puts a BOS before text (Gemma's) gets it first in every window, the text's
    tokens consecutive after it; SmolLM2's adds none, so its windows are the plain stream's."""
    from quantnpu.models.corpus import special_prefix, windows_for
    from quantnpu.models.smollm2 import load_tokenizer

    windows = token_windows(torch.arange(10, 100), 16, 3, prefix=[2])
    assert torch.equal(windows[:, 0], torch.tensor([2, 2, 2]))
    assert torch.equal(windows[:, 1:].flatten(), torch.arange(10, 55))

    class WithBos:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([2] if add_special_tokens else []) + [ord(c) for c in text]}

    assert special_prefix(WithBos()) == [2]
    smollm2 = load_tokenizer()
    assert special_prefix(smollm2) == []
    plain = windows_for(smollm2, None, "evaluation", 32, 2)
    assert plain[0, 0] != smollm2.bos_token_id and plain.shape == (2, 32)
