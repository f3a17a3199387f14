"""Text generation over a prefill + decode pair: `Generator`, what `quantnpu generate`, the lm-eval
adapter's `generate_until` and bench/generate.py all use.

A *runner* drives the two programs and keeps the cache: `CachedPte` (the `.pte` on the HTP
simulator) or `KvCacheRunner` (the derived float or Q/DQ graphs in Python). Both take
`prefill(ids [1, t])` (t <= P tokens from position 0; the cache is reset) and `step(ids [1, 1])`
(the next position), and say `prefill_tokens`, `cache_slots`, `decode_tokens`, `leading_tokens` and
`length` (positions written).

The prompt: its first min(n, P) tokens run through the prefill, the rest (a prompt longer than P)
through decode steps, one token each: the decode graph is the same function at any position, so a
long prompt costs n - P decode calls instead of a third program. Then each generated token is fed to
one decode step until EOS, `max_new_tokens`, or a full cache (the program computes positions up to
C + T - 1, its export's sequence length).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantnpu.errors import QuantNpuError

STOP_EOS = "eos"
STOP_LENGTH = "max_new_tokens"
STOP_CACHE = "cache_full"
STOP_MESSAGES = {
    STOP_EOS: "stopped at the end-of-sequence token",
    STOP_LENGTH: "stopped after {max_new_tokens} new tokens (--max-new-tokens)",
    STOP_CACHE: "stopped: the cache is full ({positions} positions; export with a longer --seq-len for more)",
}


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature` is 0 (the default); else softmax(logits / temperature) restricted to
    the smallest set of tokens whose probability reaches `top_p`, drawn with a generator seeded by `seed`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise QuantNpuError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise QuantNpuError(f"top-p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """One generation: the prompt's and the new tokens, the text of the new tokens, why it stopped,
    the seconds of the prompt (prefill and any overflow decode steps) and of the decode steps, and
    per new token the margin of the top logit over the second (how near a tie the choice was)."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop: str = STOP_LENGTH
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    margins: list[float] = field(default_factory=list)

    @property
    def prompt_tokens_per_second(self) -> float:
        return len(self.prompt_tokens) / self.prompt_seconds if self.prompt_seconds else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else float("nan")


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one position's logits `[vocab]`."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # mass of the tokens ranked above each one
        ordered[before >= sampling.top_p] = 0.0  # the top token always stays
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _margin(logits: torch.Tensor) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


class Generator:
    """Generates text from a runner (module docstring) and a Hugging Face tokenizer.

    `eos_ids`: the tokens that end a generation (the program's metadata, the tokenizer's EOS and
    the model's generation config). `generate(prompt)` returns a `Generation`; `stream(prompt)`
    yields the text as it is produced and leaves the `Generation` in `last`."""

    def __init__(self, runner, tokenizer, eos_ids: Sequence[int] = ()) -> None:
        if runner.decode_tokens != 1:
            raise QuantNpuError(f"generation feeds one token per decode step; this decode method takes {runner.decode_tokens}")
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.last: Generation | None = None

    @property
    def positions(self) -> int:
        """How many positions the program computes (the prompt and the new tokens together)."""
        return self.runner.cache_slots + self.runner.decode_tokens

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """The prompt's tokens: with `chat`, the user turn in the model's chat template followed by the
        assistant's turn opening; else the text as the tokenizer encodes it (with its BOS, if it adds one)."""
        tokenizer = self.tokenizer
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise QuantNpuError("--chat: this tokenizer has no chat template")
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(prompt)["input_ids"])

    def _check_prompt(self, tokens: Sequence[int]) -> None:
        if not tokens:
            raise QuantNpuError("the prompt is empty (no tokens)")
        if len(tokens) < max(1, self.runner.leading_tokens):
            raise QuantNpuError(f"a prompt of {len(tokens)} token(s); this program needs at least {self.runner.leading_tokens} "
                                "(its prefill computes the leading tokens' own encodings)")
        if len(tokens) > self.positions:
            raise QuantNpuError(f"a prompt of {len(tokens)} tokens does not fit the program's {self.positions} positions "
                                f"(cache of {self.runner.cache_slots} slots): shorten it, or export with a longer --seq-len")

    def prompt_logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Run the prompt (prefill, then decode steps for what exceeds P): the logits of every prompt
        position `[n, vocab]` (teacher forcing: what a perplexity through the cache reads)."""
        self._check_prompt(tokens)
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        first = min(len(tokens), self.runner.prefill_tokens)
        with torch.no_grad():
            pieces = [self.runner.prefill(ids[:, :first])[0]]
            for position in range(first, len(tokens)):
                pieces.append(self.runner.step(ids[:, position:position + 1])[0])
        return torch.cat(pieces, 0)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
               chat: bool = False) -> Iterator[str]:
        """Yield the new text piece by piece (whole characters only); `self.last` holds the result."""
        if max_new_tokens < 1:
            raise QuantNpuError(f"max new tokens must be at least 1, got {max_new_tokens}")
        tokens = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        result = self.last = Generation(prompt_tokens=tokens)
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
        start = time.perf_counter()
        logits = self.prompt_logits(tokens)[-1]
        result.prompt_seconds = time.perf_counter() - start
        shown = ""
        while True:
            token = pick_token(logits, sampling, generator)
            result.tokens.append(token)
            result.margins.append(_margin(logits))
            text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
                shown = text
            if token in self.eos_ids:
                result.stop = STOP_EOS
                break
            if len(result.tokens) >= max_new_tokens:
                result.stop = STOP_LENGTH
                break
            if self.runner.length >= self.positions:
                result.stop = STOP_CACHE
                break
            start = time.perf_counter()
            with torch.no_grad():
                logits = self.runner.step(torch.tensor([[token]], dtype=torch.long))[0, -1]
            result.decode_seconds += time.perf_counter() - start
            result.decode_steps += 1
        result.text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
        if result.text.startswith(shown) and len(result.text) > len(shown):
            yield result.text[len(shown):]

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 chat: bool = False, on_text: Callable[[str], None] | None = None) -> Generation:
        for piece in self.stream(prompt, max_new_tokens, sampling, chat):
            if on_text is not None:
                on_text(piece)
        return self.last

    def stop_message(self, generation: Generation, max_new_tokens: int) -> str:
        return STOP_MESSAGES[generation.stop].format(max_new_tokens=max_new_tokens, positions=self.positions)


def model_eos_ids(tokenizer, directory: str | Path | None = None) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's EOS and, when the model's folder has a
    `generation_config.json`, its `eos_token_id` (one id or a list)."""
    import json

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = Path(directory) / "generation_config.json" if directory is not None else None
    if config is not None and config.is_file():
        value = json.loads(config.read_text()).get("eos_token_id")
        ids.update(int(v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    return tuple(sorted(ids))
