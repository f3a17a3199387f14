"""lm-eval over quantnpu's fixed-length programs: the adapter's scores against the eager model, and
lm-eval's own evaluator on the local last-word task."""

import math

import pytest
import torch
import torch.nn.functional as F

from quantnpu.errors import QuantNpuError
from quantnpu.models.corpus import brown_split
from quantnpu.models.export import export_causal_lm
from quantnpu.models.smollm2 import load_tokenizer
from quantnpu.models.tiny import tiny_llama
from quantnpu.runtime_harness.lm_eval_adapter import QuantNpuLM, evaluate_last_word, last_word_passages

SEQ = 32
VOCAB = 49152  # SmolLM2's tokenizer


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def setting():
    model = tiny_llama(layers=1, vocab=VOCAB).eval()
    graph = export_causal_lm(model, SEQ).module()
    return model, graph, load_tokenizer()


def _eager_logprob(model, tokens: list[int], start: int) -> float:
    """sum of log p(tokens[i] | tokens[:i]) for i >= start, the eager model on exactly these tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].double()
    logprobs = F.log_softmax(logits, -1)
    return sum(float(logprobs[i - 1, tokens[i]]) for i in range(start, len(tokens)))


def _eager_greedy(model, tokens: list[int], start: int) -> bool:
    """Whether tokens[start:] are each the eager model's argmax after the tokens before them."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
    return all(int(logits[i - 1].argmax()) == tokens[i] for i in range(start, len(tokens)))


def test_loglikelihood_matches_the_eager_model_despite_padding(setting):
    model, graph, tokenizer = setting
    lm = QuantNpuLM(graph, tokenizer, SEQ, progress=False)
    context, continuation = "The jury said it did find that the", " election"
    (score, greedy), = lm.loglikelihood([_Request(context, continuation)])
    context_tokens, continuation_tokens = lm._encode_pair(context, continuation)
    assert len(context_tokens) + len(continuation_tokens) < SEQ  # padded on the right
    expected = _eager_logprob(model, context_tokens + continuation_tokens, len(context_tokens))
    assert score == pytest.approx(expected, abs=1e-4)
    # greedy: every continuation token is the eager model's argmax. " election" is not; the eager
    # model's own next token after the context is
    assert greedy is False and not _eager_greedy(model, context_tokens + continuation_tokens, len(context_tokens))
    with torch.no_grad():
        top = int(model(input_ids=torch.tensor([context_tokens]), use_cache=False).logits[0, -1].argmax())
    choice = tokenizer.decode([top])
    assert lm._encode_pair(context, choice)[1] == [top]
    (_, greedy), = lm.loglikelihood([_Request(context, choice)])
    assert greedy is True


def test_long_context_is_cut_from_the_left(setting):
    model, graph, tokenizer = setting
    lm = QuantNpuLM(graph, tokenizer, SEQ, progress=False)
    context = " ".join(["the grand jury commented on a number of other topics"] * 8)
    (score, _), = lm.loglikelihood([_Request(context, " today")])
    context_tokens, continuation_tokens = lm._encode_pair(context, " today")
    kept = (context_tokens + continuation_tokens)[-(SEQ + 1):]
    assert len(context_tokens) > SEQ
    # the graph sees the last SEQ tokens before the final one; the eager model sees the same window
    window = kept[:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window]), use_cache=False).logits[0].double()
    expected = float(F.log_softmax(logits[-1], -1)[kept[-1]]) if len(continuation_tokens) == 1 else None
    assert expected is not None and score == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_once(setting):
    model, graph, tokenizer = setting
    lm = QuantNpuLM(graph, tokenizer, SEQ, progress=False)
    text = "It recommended that Fulton legislators act to have these laws studied and revised."
    (total,) = lm.loglikelihood_rolling([_Request(text)])
    tokens = lm._encode(text)
    assert len(tokens) < SEQ  # one window: the prefix token, then every token of the text predicted
    assert total == pytest.approx(_eager_logprob(model, [lm.prefix_token_id] + tokens, 1), abs=1e-4)


def test_generation_is_refused_with_a_reason(setting):
    _, graph, tokenizer = setting
    with pytest.raises(QuantNpuError, match="need a prefill \\+ decode program"):
        QuantNpuLM(graph, tokenizer, SEQ).generate_until([_Request("a", {})])


def test_generate_until_through_the_cache_is_transformers_greedy_generate(setting):
    """With a Generator over the derived prefill + decode graphs, generate_until's text is what
    transformers' own greedy `generate` (KV cache) continues the context with, cut at a stop string."""
    from quantnpu.graph.decode import KvCacheRunner, derive_decode, derive_prefill
    from quantnpu.passes import AnnotateRoles, Canonicalize, FoldConstants, PassManager
    from quantnpu.runtime_harness.generate import Generator

    model, graph, tokenizer = setting
    front = PassManager([Canonicalize(), FoldConstants(), AnnotateRoles()]).run(export_causal_lm(model, SEQ).module())
    generator = Generator(KvCacheRunner(derive_prefill(front, 8), derive_decode(front, SEQ - 1)), tokenizer)
    lm = QuantNpuLM(graph, tokenizer, SEQ, progress=False, generator=generator)
    context = "The jury said it did find that many of"
    ids = torch.tensor([lm._encode(context)])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)[0, ids.shape[1]:]
    text = tokenizer.decode(expected, skip_special_tokens=True)
    (whole,) = lm.generate_until([_Request(context, {"until": [], "max_gen_toks": 6})])
    assert whole == text
    stop = text[len(text) // 2:][:2]
    (cut,) = lm.generate_until([_Request(context, {"until": [stop], "max_gen_toks": 6})])
    assert cut == text[:text.index(stop)]


def test_last_word_passages_from_brown():
    passages = last_word_passages(brown_split().evaluation_text, 50)
    assert len(passages) == 50
    for p in passages:
        assert p["target"].isalpha() and len(p["context"].split()) >= 19 and not p["context"].endswith(" ")


def test_lm_eval_runs_the_local_task_and_its_metrics_are_right(setting, tmp_path):
    """A model with uniform logits: accuracy 0 unless a word's first token is token 0, and the word
    perplexity lm-eval reports is exp(mean over words of tokens x log V), exactly."""
    _, _, tokenizer = setting
    uniform = lambda ids: torch.zeros(ids.shape[0], ids.shape[1], VOCAB)  # noqa: E731
    text = brown_split().evaluation_text
    result = evaluate_last_word(uniform, tokenizer, SEQ * 4, text, tmp_path, limit=12, count=12, name="uniform")
    lm = QuantNpuLM(uniform, tokenizer, SEQ * 4, progress=False)
    lengths = [len(lm._encode_pair(p["context"], " " + p["target"])[1]) for p in last_word_passages(text, 12)]
    assert result["documents"] == 12 and result["acc"] == 0.0
    expected = math.exp(sum(n * math.log(VOCAB) for n in lengths) / len(lengths))
    assert result["word_perplexity"] == pytest.approx(expected, rel=1e-6)
