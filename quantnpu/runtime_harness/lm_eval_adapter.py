"""lm-eval (`lm_eval`, EleutherAI's harness) for anything quantnpu measures: the float graph, the
fake-quant or Q/DQ graph, and the `.pte` on the HTP simulator.

`QuantNpuLM` wraps a callable `input_ids [1, seq] -> logits [1, seq, vocab]` whose sequence length
is fixed by the export (a `.pte` cannot take another): each request is laid out from the first
position and padded on the right, which a causal model never reads, and its context is cut from the
left where it does not fit. `loglikelihood` and `loglikelihood_rolling` are implemented (every
multiple-choice and perplexity task); `generate_until` (generation tasks) needs a prefill + decode
program: give `generator` (a `quantnpu.runtime_harness.generate.Generator`), which generates greedily
(or with the request's temperature) until one of the request's stop strings, `max_gen_toks` tokens,
EOS or a full cache; a context longer than the program's positions keeps its last tokens.

`last_word_task` writes a local task (a YAML and its JSON Lines data) in the style of LAMBADA:
predict the last word of a passage from the text before it. The hub's datasets cannot be fetched
here, so the passages come from a text the caller gives (Brown's evaluation split by default).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from quantnpu.errors import QuantNpuError
from quantnpu.fileio import atomic_write_text

try:  # lm-eval is a dependency; a clear message if an environment lacks it
    from lm_eval.api.model import LM
except ImportError as error:  # pragma: no cover
    raise QuantNpuError("lm-eval is not installed (pip install lm-eval)") from error


class QuantNpuLM(LM):
    """lm-eval's model interface over a fixed-length `forward(input_ids) -> logits`."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], tokenizer, seq_len: int,
                 name: str = "quantnpu", progress: bool = True, generator=None) -> None:
        super().__init__()
        if seq_len < 2:
            raise QuantNpuError(f"seq_len must be at least 2, got {seq_len}")
        self.forward, self.tokenizer, self.seq_len, self.name, self.progress = forward, tokenizer, seq_len, name, progress
        self.generator = generator
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise QuantNpuError("the tokenizer has neither a BOS nor an EOS token to start a rolling window with")
        self.prefix_token_id = int(prefix)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # a context's trailing spaces belong to the continuation (how the tokenizer sees the joined text)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_tokens = self._encode(context)
        return whole[:len(context_tokens)], whole[len(context_tokens):]

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether each continuation token is the argmax."""
        if not continuation:
            raise QuantNpuError("lm-eval request with an empty continuation")
        if len(continuation) > self.seq_len:
            raise QuantNpuError(f"a continuation of {len(continuation)} tokens does not fit the program's {self.seq_len}")
        tokens = (context + continuation)[-(self.seq_len + 1):]
        inputs = tokens[:-1]
        length = len(inputs)
        ids = torch.tensor([inputs + [self.pad_token_id] * (self.seq_len - length)], dtype=torch.long)
        with torch.no_grad():
            logits = self.forward(ids)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        positions = torch.arange(length - len(continuation), length)
        logprobs = F.log_softmax(logits[0, positions].double(), dim=-1)
        target = torch.tensor(continuation)
        total = float(logprobs.gather(1, target[:, None]).sum())
        greedy = bool((logprobs.argmax(-1) == target).all())
        return total, greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc=f"{self.name} loglikelihood", disable=not self.progress):
            context, continuation = request.args
            context_tokens, continuation_tokens = self._encode_pair(context, continuation)
            if not context_tokens:
                context_tokens = [self.prefix_token_id]
            results.append(self._score(context_tokens, continuation_tokens))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for request in tqdm(requests, desc=f"{self.name} rolling loglikelihood", disable=not self.progress):
            (text,) = request.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.seq_len, context_len=1))
            results.append(sum(self._score(context, continuation)[0] for context, continuation in windows))
        return results

    def generate_until(self, requests) -> list[str]:
        from quantnpu.runtime_harness.generate import Sampling

        if self.generator is None:
            raise QuantNpuError("generation tasks need a prefill + decode program (tools/lower.py --decode) given as "
                                "QuantNpuLM(..., generator=Generator(...)); a fixed-length program has no KV cache")
        results = []
        for request in tqdm(requests, desc=f"{self.name} generate_until", disable=not self.progress):
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop("max_gen_toks", 256))
            temperature = float(options.pop("temperature", 0.0)) if options.pop("do_sample", False) else 0.0
            tokens = self._encode(context) or [self.prefix_token_id]
            # the context keeps its last tokens where it and one new token would not fit
            tokens = tokens[-(self.generator.positions - 1):] if len(tokens) >= self.generator.positions else tokens
            max_new = max(1, min(max_new, self.generator.positions - len(tokens) + 1))
            text = ""
            for piece in self.generator.stream(tokens, max_new, Sampling(temperature=temperature)):
                text += piece
                if any(stop in text for stop in until):
                    break
            cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
            results.append(text[:cut])
        return results


_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{2,})[\"'.!?;:,)]*$", re.S)


def last_word_passages(text: str, count: int, sentences: int = 3, min_words: int = 20) -> list[dict]:
    """Passages of `sentences` consecutive lines (sentences) of `text`, within one paragraph, whose
    last token is a word: `{"context": text before it, "target": the word}`, in order."""
    passages = []
    for paragraph in text.split("\n\n"):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        for start in range(0, len(lines) - sentences + 1, sentences):
            passage = " ".join(lines[start:start + sentences])
            match = _LAST_WORD.match(passage)
            if match is None or len(passage.split()) < min_words:
                continue
            passages.append({"context": match.group("context"), "target": match.group("word")})
            if len(passages) == count:
                return passages
    return passages


def last_word_task(directory: str | Path, text: str, count: int = 200, name: str = "quantnpu_last_word") -> tuple[Path, str]:
    """Write the last-word task (YAML + data) into `directory`; returns (directory, task name) for
    `lm_eval.tasks.TaskManager(include_path=directory)`. Metrics: accuracy (the word is the greedy
    continuation) and the word's perplexity."""
    passages = last_word_passages(text, count)
    if not passages:
        raise QuantNpuError("no passage of the text ends in a word: cannot build the last-word task")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    atomic_write_text(data, "".join(json.dumps(p) + "\n" for p in passages))
    atomic_write_text(directory / f"{name}.yaml", "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "output_type: loglikelihood",
        "test_split: test",
        'doc_to_text: "{{context}}"',
        "doc_to_target: \"{{' ' + target}}\"",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: perplexity",
        "    aggregation: perplexity",
        "    higher_is_better: false",
        "metadata:",
        "  version: 1.0",
        "",
    ]))
    return directory, name


def evaluate_last_word(forward: Callable[[torch.Tensor], torch.Tensor], tokenizer, seq_len: int, text: str,
                       work_dir: str | Path, limit: int | None = None, count: int = 200, name: str = "model") -> dict:
    """Accuracy and word perplexity of `forward` on the last-word task built from `text`, through
    lm-eval's own evaluator."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    directory, task = last_word_task(work_dir, text, count)
    results = simple_evaluate(model=QuantNpuLM(forward, tokenizer, seq_len, name), tasks=[task], limit=limit,
                              task_manager=TaskManager(include_path=str(directory)), log_samples=False)
    metrics = results["results"][task]
    return {"acc": metrics["acc,none"], "acc_stderr": metrics.get("acc_stderr,none"),
            "word_perplexity": metrics["perplexity,none"], "documents": limit or count}
