"""Generation over a prefill + decode pair (quantnpu.runtime_harness.generate): the loop, its stops,
prompts longer than the prefill, sampling, and the `quantnpu generate` command's errors. The
runner here is the float derived graphs (KvCacheRunner); the .pte runner is in test_decode_quant."""

import warnings

import pytest
import torch

from quantnpu.cli import quantnpu_main
from quantnpu.errors import QuantNpuError
from quantnpu.graph.decode import KvCacheRunner, derive_decode, derive_prefill
from quantnpu.graph.equivalence import as_float64
from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import tiny_model
from quantnpu.passes import AnnotateRoles, Canonicalize, FoldConstants, PassManager
from quantnpu.runtime_harness.generate import STOP_CACHE, STOP_EOS, STOP_LENGTH, Generator, Sampling, pick_token

SEQ = 12
PREFILL = 4


class TokenNames:
    """The little a Generator asks of a tokenizer, for token-id prompts: text is the ids' names."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def graph():
    gm = export_causal_lm(tiny_model("llama", layers=2), SEQ).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PassManager([Canonicalize(), FoldConstants(), AnnotateRoles()]).run(as_float64(gm))


def _generator(graph, eos=()):
    runner = KvCacheRunner(derive_prefill(graph, PREFILL), derive_decode(graph, SEQ - 1))
    return Generator(runner, TokenNames(), eos)


def _greedy_without_cache(graph, prompt: list[int], count: int) -> list[int]:
    """Greedy continuation by re-running the full-sequence graph on the whole text for each token."""
    tokens = list(prompt)
    for _ in range(count):
        ids = torch.zeros(1, SEQ, dtype=torch.long)
        ids[0, :len(tokens)] = torch.tensor(tokens)
        tokens.append(int(graph(ids)[0, len(tokens) - 1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("prompt", [[5, 17, 3], [5, 17, 3, 99, 42, 8, 61]], ids=["shorter than P", "longer than P"])
def test_greedy_generation_equals_rerunning_the_full_graph(graph, prompt):
    """Through the cache (a prompt longer than P goes on in decode steps) the greedy tokens are the
    full-sequence graph's, and the prompt's logits are its logits at every position."""
    generator = _generator(graph)
    ids = torch.zeros(1, SEQ, dtype=torch.long)
    ids[0, :len(prompt)] = torch.tensor(prompt)
    full = graph(ids)[0, :len(prompt)]
    through_cache = generator.prompt_logits(prompt)
    assert ((through_cache - full).abs().max() / full.abs().max()).item() < 1e-9
    count = SEQ - len(prompt)
    result = generator.generate(prompt, max_new_tokens=count)
    assert result.tokens == _greedy_without_cache(graph, prompt, count)
    assert result.stop == STOP_LENGTH and result.decode_steps == count - 1
    assert result.text == "".join(f"<{t}>" for t in result.tokens)
    assert len(result.margins) == count and min(result.margins) >= 0


def test_stops_at_a_full_cache_and_at_eos(graph):
    generator = _generator(graph)
    prompt = [5, 17, 3]
    # the program computes SEQ positions: SEQ - 3 new tokens, the last of them not fed back
    full = generator.generate(prompt, max_new_tokens=100)
    assert full.stop == STOP_CACHE and len(full.tokens) == SEQ - len(prompt) + 1
    assert "cache is full (12 positions" in generator.stop_message(full, 100)
    eos = full.tokens[2]
    stopped = _generator(graph, eos=[eos]).generate(prompt, max_new_tokens=100)
    assert stopped.stop == STOP_EOS and stopped.tokens == full.tokens[:full.tokens.index(eos) + 1]


def test_streamed_pieces_join_to_the_text(graph):
    generator = _generator(graph)
    pieces = list(generator.stream([5, 17, 3], max_new_tokens=5))
    assert "".join(pieces) == generator.last.text and len(pieces) == 5


def test_prompt_errors_are_one_line(graph):
    generator = _generator(graph)
    with pytest.raises(QuantNpuError, match="does not fit the program's 12 positions"):
        generator.generate(list(range(1, SEQ + 2)))
    with pytest.raises(QuantNpuError, match="prompt is empty"):
        generator.generate([])
    with pytest.raises(QuantNpuError, match="at least 1"):
        generator.generate([1], max_new_tokens=0)
    with pytest.raises(QuantNpuError, match="top-p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([2.0, 1.9, -5.0, -6.0])
    draws = [pick_token(logits, Sampling(1.0, 1.0, 0), torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) >= {0, 1}  # both near-tied tokens are drawn
    again = [pick_token(logits, Sampling(1.0, 1.0, 0), torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == again
    # top-p 0.5: only the top token holds half the mass on its own
    nucleus = {pick_token(logits, Sampling(1.0, 0.5, 0), torch.Generator().manual_seed(s)) for s in range(40)}
    assert nucleus == {0}
    assert pick_token(logits, Sampling(), None) == 0


def test_generate_command_errors_are_one_line(tmp_path, capfd):
    missing = tmp_path / "missing.pte"
    assert quantnpu_main(["generate", str(missing), "--prompt", "hi"]) == 2
    assert capfd.readouterr().err.strip() == f"error: {missing}: no such file"
    assert quantnpu_main(["generate", str(missing), "--prompt", "hi", "--top-p", "0.9"]) == 2
    assert "give --temperature > 0" in capfd.readouterr().err
    assert quantnpu_main(["generate", str(missing), "--prompt", "hi", "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer in this folder" in capfd.readouterr().err
