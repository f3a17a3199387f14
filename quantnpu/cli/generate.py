"""`quantnpu generate MODEL.pte --prompt "..."`: generate text with a prefill + decode `.pte`
(`tools/lower.py --decode`) on the HTP simulator, streamed as it is produced, then the prompt's and
the decode steps' tokens per second."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from quantnpu.cli.common import check_positive, run_quietly
from quantnpu.errors import QuantNpuError


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantnpu generate", description="Generate text with a prefill + decode .pte "
                                     "(written by `quantnpu lower --decode`) on the QNN HTP simulator.")
    parser.add_argument("model", help="the .pte, with methods prefill and decode")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer directory of the model (default: SmolLM2's)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="stop after N new tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (the default) is greedy; > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling: keep the top tokens "
                        "holding probability P (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("-q", "--quiet", action="store_true", help="print the generated text only")
    parser.add_argument("-v", "--verbose", action="store_true", help="show ExecuTorch's and QNN's own log lines")
    return parser


def generate(args: argparse.Namespace) -> int:
    from quantnpu.cli.lower import load_tokenizer
    from quantnpu.runtime_harness.generate import Generator, Sampling, model_eos_ids
    from quantnpu.runtime_harness.pte import CachedPte

    check_positive("--max-new-tokens", args.max_new_tokens)
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    if args.top_p != 1.0 and args.temperature == 0:
        raise QuantNpuError("--top-p samples: give --temperature > 0 too")
    tokenizer = load_tokenizer(args.tokenizer)
    program = CachedPte(args.model)
    vocab = program.meta["vocab_size"]
    if len(tokenizer) > vocab:
        raise QuantNpuError(f"{args.model}: the model predicts {vocab} tokens but the tokenizer has {len(tokenizer)}; "
                            "pass --tokenizer with the model's own tokenizer")
    eos = set(program.meta.get("eos_ids") or ()) | set(model_eos_ids(tokenizer, args.tokenizer))
    generator = Generator(program, tokenizer, sorted(eos))
    tokens = generator.encode(args.prompt, args.chat)
    if not args.quiet:
        print(f"[{len(tokens)} prompt tokens; the program computes {generator.positions} positions: "
              f"prefill {program.prefill_tokens}, then one decode step per token]", file=sys.stderr, flush=True)
    result = generator.generate(tokens, args.max_new_tokens, sampling,
                                on_text=lambda piece: print(piece, end="", flush=True))
    print()
    if not args.quiet:
        print(f"[{generator.stop_message(result, args.max_new_tokens)}; {len(result.tokens)} new tokens. On the HTP simulator: "
              f"prompt {result.prompt_tokens_per_second:.2f} tokens/s ({len(result.prompt_tokens)} in {result.prompt_seconds:.1f} s), "
              f"decode {result.decode_tokens_per_second:.2f} tokens/s ({result.decode_steps} steps in {result.decode_seconds:.1f} s)]",
              file=sys.stderr)
    return 0


def generate_main(argv: Sequence[str] | None = None) -> int:
    return run_quietly(generate, generate_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))
