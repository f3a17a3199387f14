"""`quantnpu lower` (tools/lower.py): quantize a decoder LM `.pt2` and lower it to a QNN HTP `.pte`.

The flags come in groups, one per stage (`add_*_flags`). `LowerJob.from_args` turns them into one
immutable job, checking every user error before anything expensive runs; the recipe flags change
fields of a `Recipe` (`--recipe`, default `shipped`: quantnpu.pipeline.SHIPPED), so a default lives
in one place. `lower(job)` runs the stages, one small function each: load, calibration, passes,
lowering, evaluation, agreement, record.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from quantnpu.cli.common import Stages, check_positive
from quantnpu.errors import QuantNpuError

SMOLLM2_VOCAB = 49152
_RESULT_NAMES = {"float_graph": "float (input graph)", "fake_quant": "fake-quant (Q/DQ)", "pte_htp_simulator": ".pte, HTP simulator"}


# ---- flags, by stage ---------------------------------------------------------------------------

def add_input_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a .pt2 written by torch.export.save (e.g. by quantnpu-export)")
    parser.add_argument("-o", "--output", help="the .pte to write (default: <model>.<quant>.pte beside the model)")
    parser.add_argument("--record", help="JSON record of the run (default: <output>.json)")


def add_plan_flags(parser: argparse.ArgumentParser) -> None:
    from quantnpu.pipeline import RECIPES, SHIPPED
    from quantnpu.quantizers.et_qnn import ET_CONFIGS

    group = parser.add_argument_group("recipe and bit plan", "what the chain does; every flag below that is not given "
                                      "takes the recipe's value")
    group.add_argument("--recipe", choices=tuple(RECIPES), default=SHIPPED.name,
                       help="shipped (the default: the paper's method + smoothing, GPTQ, leading-token split), "
                            "paper (stage one + 10%% promotion only) or static (R1/R2 + Max-Min encodings)")
    group.add_argument("--quant", default="quantnpu", help="quantnpu (static encodings from the bit plan, QuantNpuQuantizer; the default) "
                       f"or ExecuTorch's QnnQuantizer for comparison: {', '.join('et-' + c for c in ET_CONFIGS)}")
    group.add_argument("--bits", help=f"bit plan W-A-KV: 8-8-8, 4-8-8 (the recipe's: {SHIPPED.bits}) or 4-4-8 "
                       "(4-bit activations are fake-quant only)")
    group.add_argument("--override", action="append", default=[], metavar="PATTERN=BITS",
                       help="bit plan override, repeatable, e.g. '*.down_proj.input=16' (patterns match tensor labels and node names)")
    group.add_argument("--promote-fraction", type=float, metavar="P",
                       help="mixed precision: the fraction of layers whose down_proj input, ranked by its 8-bit error on the "
                            f"calibration set, is promoted to 16 bits (shipped: {SHIPPED.promote_fraction}; 0 turns it off); "
                            "--override still wins")
    group.add_argument("--rotate", help="R1/R2 rotations fused into the weights: hadamard (random Hadamard; the recipes', "
                       "falling back to a random orthogonal matrix with a warning for sizes with no Hadamard construction, "
                       "which is an error when hadamard is asked for explicitly), random (random orthogonal), none")
    group.add_argument("--soc", default="SM8650", help="Qualcomm SoC to compile for (default SM8650, Snapdragon 8 Gen 3)")


def add_stage_one_flags(parser: argparse.ArgumentParser) -> None:
    from quantnpu.passes.learn_encodings import INITS, LOSSES, OPTIMIZE, SIMULATIONS
    from quantnpu.pipeline import SHIPPED

    shipped = SHIPPED.stage_one
    group = parser.add_argument_group(
        "stage one", "learn the linears' scales with R1/R2 before static calibration (quantnpu only; METHOD.md 'Stage one'). "
        "The exported program fixes batch and sequence length: a step runs --step-windows windows one after another "
        "(batch x accumulation); under torchrun they are split across ranks. Defaults: the recipe's")
    group.add_argument("--optimize", choices=OPTIMIZE,
                       help=f"selective (shipped: rotated linear inputs and all layer weights), joint (every linear input and weight, "
                            "lm_head too), rotations (R1/R2 only), none (no stage one)")
    group.add_argument("--steps", type=int, help=f"optimizer steps (shipped {shipped.steps}: ~2 min at 128 tokens on 2 cores)")
    group.add_argument("--step-windows", type=int, metavar="N", help=f"calibration windows per step (shipped {shipped.batch})")
    group.add_argument("--local-steps", type=int, metavar="T", help="steps with the local quantization-error loss (shipped: a quarter of --steps)")
    group.add_argument("--local-weight", type=float, metavar="LAMBDA", help=f"weight of the local loss (shipped {shipped.local_weight})")
    group.add_argument("--lr-rotation", type=float, help=f"Cayley SGD lr of R1/R2 (shipped {shipped.lr_rotation}, the paper's; "
                       "bench/results/stage_one.md: 2.0 with 4-bit weights)")
    group.add_argument("--lr-scale", type=float, help=f"SGD lr of the scales, relative to each scale's size (shipped {shipped.lr_scale})")
    group.add_argument("--momentum", type=float, help=f"momentum of both optimizers (shipped {shipped.momentum})")
    group.add_argument("--loss", choices=LOSSES, help="ce: next-token cross-entropy (shipped); kl: KL to the float model's logits")
    group.add_argument("--init", choices=INITS, help="initial scales: rule (rotation-and-bit-width-aware; shipped) or maxmin")
    group.add_argument("--simulate", choices=SIMULATIONS,
                       help="static (shipped) or dynamic (per-token activations while learning, SpinQuant's way; their static "
                            "encodings come from stage two)")
    group.add_argument("--checkpoint", metavar="FILE", help="stage-one checkpoint (default: beside the output, removed after a finished run)")
    group.add_argument("--checkpoint-every", type=int, metavar="N", help=f"steps between checkpoints (shipped {shipped.checkpoint_every})")
    group.add_argument("--resume", action="store_true", help="continue stage one from the checkpoint (same command otherwise)")


def add_beyond_flags(parser: argparse.ArgumentParser) -> None:
    from quantnpu.passes.round_weights import WEIGHT_ROUNDING
    from quantnpu.passes.smooth_inputs import SMOOTH_MODES
    from quantnpu.passes.split_leading_tokens import SPLIT_MODES
    from quantnpu.pipeline import SHIPPED

    group = parser.add_argument_group("beyond the paper", "static smoothing of the unrotated linear inputs, GPTQ rounding of "
                                      "the narrow weights and the leading-token split (bench/results/smoothing.md). Defaults: the recipe's")
    group.add_argument("--smooth", choices=SMOOTH_MODES,
                       help="per-channel smoothing of down_proj's and o_proj's inputs, folded into up/down and v/o: off, fixed "
                            "(one alpha), search (per layer, by the linear's quantized output error; shipped), learn (search, "
                            "then learned in stage one)")
    group.add_argument("--smooth-alpha", type=float, metavar="A", help="migration strength of --smooth fixed, in [0, 1] (default 0.5)")
    group.add_argument("--weight-rounding", choices=WEIGHT_ROUNDING,
                       help=f"nearest or gptq: the weights of at most --gptq-bits bits re-rounded with the calibration inputs, "
                            f"same scales (shipped {SHIPPED.weight_rounding})")
    group.add_argument("--gptq-bits", type=int, choices=(4, 8), help=f"GPTQ rounds weights of at most this many bits (shipped {SHIPPED.gptq_bits})")
    group.add_argument("--split-leading", choices=SPLIT_MODES,
                       help="give the first --leading-tokens positions their own copy of an MLP, with encodings of its own "
                            "(exact in float; the attention sink's huge values then stop setting the other tokens' scales): "
                            f"off, auto (the MLPs where those positions are over {SHIPPED.leading_split.threshold:g}x larger than "
                            "the rest on the calibration set; shipped), all")
    group.add_argument("--leading-tokens", type=int, metavar="N",
                       help=f"how many leading positions --split-leading separates (shipped {SHIPPED.leading_split.tokens})")


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "prefill + decode", "a program that generates text (`quantnpu generate`): the prefill and KV-cache decode graphs are "
        "derived from the pipeline's fake-quant graph and converted with its one set of encodings (README 'Generation')")
    group.add_argument("--decode", action="store_true",
                       help="write one .pte with methods prefill and decode instead of the fixed-length forward; with --eval "
                            "the .pte's perplexity is measured through them (prefill, then one decode step per token)")
    group.add_argument("--prefill-tokens", type=int, metavar="P", help="tokens per prefill call (default: the cache's "
                       "slots, so a prompt up to the exported length - 1 and an --eval window take one call; a smaller P "
                       "costs less for short prompts, a longer prompt goes on in decode steps)")
    group.add_argument("--cache-slots", type=int, metavar="C", help="K/V cache slots per layer (default: the exported length "
                       "- 1, so positions reach the export's last; RoPE tables end there)")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration and evaluation text")
    group.add_argument("--calib-windows", type=int, default=16, help="calibration windows (of the model's sequence length)")
    group.add_argument("--calib-text", metavar="FILE", help="calibrate on this text (plain UTF-8, or .jsonl with a 'text' field) "
                       "instead of Brown's calibration split")
    group.add_argument("--eval", action="store_true", help="also measure perplexity: float graph, fake-quant graph, and the .pte on "
                       "the HTP simulator")
    group.add_argument("--eval-windows", type=int, default=2, help="evaluation windows (each takes ~30 s on the simulator for SmolLM2 "
                       "at 128 tokens)")
    group.add_argument("--eval-text", metavar="FILE", help="evaluate on this text (plain or .jsonl) instead of Brown's evaluation split")
    group.add_argument("--tokenizer", help="Hugging Face tokenizer directory for the calibration/eval text (default: SmolLM2's)")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and checks")
    group.add_argument("--encodings", help="write the encodings (AIMET-style JSON) to this file")
    group.add_argument("--stop-after", metavar="PASS", help="stop the pipeline after this pass (any of them, e.g. AnnotateRoles, "
                       "StaticCalibration) and print the graph")
    group.add_argument("--no-verify", action="store_true", help="skip the check that the float passes keep the input graph's "
                       "function (on seeded random ids); only for a graph you know the verifier cannot run")
    group.add_argument("--allow-cpu-ops", action="store_true", help="accept ops left outside QNN delegates")
    group.add_argument("--check-agreement", action="store_true",
                       help="after lowering, run a copy of the program that also returns every quantized tensor on the HTP "
                            "simulator (one calibration window) and compare each with its op recomputed in the Q/DQ graph "
                            "from the device's own inputs; prints the largest difference per layer, exit code 3 if any "
                            "tensor is over 2 8-bit steps' worth")
    group.add_argument("--no-memory-check", action="store_true",
                       help="run even if the estimated peak memory (printed before the passes) exceeds what this machine has")
    group.add_argument("-q", "--quiet", action="store_true")
    group.add_argument("-v", "--verbose", action="store_true", help="show ExecuTorch's and QNN's own log lines")


def lower_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantnpu-lower",
        description="Quantize a decoder LM .pt2 (input_ids -> logits) and lower it to a QNN HTP .pte.",
    )
    for add in (add_input_flags, add_plan_flags, add_stage_one_flags, add_beyond_flags, add_decode_flags, add_data_flags,
                add_output_flags):
        add(parser)
    return parser


# ---- the job -----------------------------------------------------------------------------------

def _quant_choices() -> list[str]:
    from quantnpu.quantizers.et_qnn import ET_CONFIGS

    return ["quantnpu"] + [f"et-{c}" for c in ET_CONFIGS]


_STAGE_ONE_FLAGS = {  # flag -> StageOneConfig field
    "--steps": "steps", "--step-windows": "batch", "--local-steps": "local_steps", "--local-weight": "local_weight",
    "--lr-rotation": "lr_rotation", "--lr-scale": "lr_scale", "--momentum": "momentum", "--loss": "loss", "--init": "init",
    "--simulate": "simulate", "--checkpoint-every": "checkpoint_every",
}


def _flag_value(args: argparse.Namespace, flag: str):
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def _given(args: argparse.Namespace, flags) -> list[str]:
    return [flag for flag in flags if _flag_value(args, flag) not in (None, False, [])]


def _stage_one(args: argparse.Namespace, recipe, output: Path):
    """The recipe's StageOneConfig changed by the stage-one flags (None: no stage one)."""
    from quantnpu.passes.learn_encodings import StageOneConfig

    stage_one = recipe.stage_one
    if args.optimize == "none":
        stage_one = None
    elif args.optimize is not None:
        stage_one = replace(stage_one or StageOneConfig(), optimize=args.optimize)
    given = _given(args, [*_STAGE_ONE_FLAGS, "--checkpoint", "--resume"])
    if stage_one is None:
        if given:
            raise QuantNpuError(f"{'/'.join(given)} {'needs' if len(given) == 1 else 'need'} stage one, which this run does not have "
                                f"(recipe {recipe.name}{', --optimize none' if args.optimize == 'none' else ''}): "
                                "add --optimize selective")
        return None
    changes = {field: _flag_value(args, flag) for flag, field in _STAGE_ONE_FLAGS.items() if _flag_value(args, flag) is not None}
    checkpoint = args.checkpoint or str(output.with_suffix(".stage1.ckpt"))
    if args.resume and not Path(checkpoint).is_file():
        raise QuantNpuError(f"--resume: no stage-one checkpoint at {checkpoint}")
    return replace(stage_one, **changes, checkpoint=checkpoint, resume=args.resume)


def _beyond(args: argparse.Namespace, recipe) -> dict:
    """The recipe fields the smoothing, rounding and split flags change."""
    from quantnpu.passes.smooth_inputs import SmoothingConfig
    from quantnpu.passes.split_leading_tokens import LeadingTokenSplit

    changes: dict = {}
    smoothing = recipe.smoothing
    if args.smooth is not None:
        smoothing = None if args.smooth == "off" else replace(smoothing or SmoothingConfig(), mode=args.smooth)
    if args.smooth_alpha is not None:
        if smoothing is None or smoothing.mode != "fixed":
            raise QuantNpuError("--smooth-alpha sets the alpha of --smooth fixed: add --smooth fixed")
        smoothing = replace(smoothing, alpha=args.smooth_alpha)
    if smoothing != recipe.smoothing:
        changes["smoothing"] = smoothing
    split = recipe.leading_split
    if args.split_leading is not None:
        split = None if args.split_leading == "off" else replace(split or LeadingTokenSplit(), mode=args.split_leading)
    if args.leading_tokens is not None:
        if split is None:
            raise QuantNpuError("--leading-tokens needs the leading-token split: add --split-leading auto or all")
        split = replace(split, tokens=args.leading_tokens)
    if split != recipe.leading_split:
        changes["leading_split"] = split
    if args.weight_rounding is not None:
        changes["weight_rounding"] = args.weight_rounding
    if args.gptq_bits is not None:
        changes["gptq_bits"] = args.gptq_bits
    return changes


def plan_from_args(args: argparse.Namespace):
    """The bit plan the flags ask for (the recipe's `bits` unless `--bits`), or None with `--quant et-*`,
    where quantnpu's own flags are errors."""
    from quantnpu.pipeline import RECIPES
    from quantnpu.quantizers.bit_plan import BitPlan

    if args.quant != "quantnpu":
        for flags, verb in ((["--bits", "--override"], "belong"), (["--optimize", "--resume"], "belong"),
                            (["--smooth", "--weight-rounding"], "belong"), (["--split-leading"], "belongs")):
            if _given(args, flags):
                raise QuantNpuError(f"{'/'.join(flags)} {verb} to --quant quantnpu, not {args.quant}")
        given = _given(args, [*_STAGE_ONE_FLAGS, "--checkpoint", "--promote-fraction", "--smooth-alpha", "--gptq-bits",
                              "--leading-tokens", "--encodings"])
        if given:
            raise QuantNpuError(f"{'/'.join(given)} {'needs' if len(given) == 1 else 'need'} --quant quantnpu, not {args.quant}")
        return None
    plan = BitPlan.parse(args.bits or RECIPES[args.recipe].bits, args.override)
    low_activation = [p for p, bits in plan.overrides if bits < 8 and not p.endswith(".weight")]
    if plan.activations < 8 or low_activation:
        raise QuantNpuError(f"--bits {plan.name}: QNN HTP runs 8- and 16-bit activations only; "
                            "4-bit activations can be evaluated as fake-quant (bench/static.py), not lowered")
    return plan


def recipe_from_args(args: argparse.Namespace, plan, output: Path):
    """The recipe the flags ask for: `--recipe`'s, with the fields the other flags give changed
    (with `--quant et-*`, only its rotation matters). `output` places the default stage-one checkpoint."""
    from quantnpu.pipeline import RECIPES

    base = RECIPES[args.recipe]
    if plan is None:
        return base.replace(rotate=args.rotate or base.rotate)
    if args.promote_fraction is not None and not 0.0 <= args.promote_fraction <= 1.0:
        raise QuantNpuError(f"--promote-fraction must be between 0 and 1, got {args.promote_fraction}")
    changes = _beyond(args, base)
    stage_one = _stage_one(args, base, output)
    smoothing = changes.get("smoothing", base.smoothing)
    if smoothing is not None and smoothing.mode == "learn" and stage_one is None:
        raise QuantNpuError("--smooth learn learns the factors in stage one: add --optimize selective (or joint)")
    if stage_one != base.stage_one:
        changes["stage_one"] = stage_one
    if args.bits is not None:
        changes["bits"] = args.bits
    if args.rotate is not None:
        changes["rotate"] = args.rotate
    if args.promote_fraction is not None:
        changes["promote_fraction"] = args.promote_fraction
    return base.replace(**changes)


@dataclass(frozen=True)
class LowerJob:
    """One `quantnpu lower` run, checked: what the flags asked for, nothing computed yet."""

    model: Path
    output: Path
    record: Path
    quant: str                       # "quantnpu" or "et-<config>"
    plan: object                     # quantnpu's BitPlan; None with an ExecuTorch config
    recipe: object                   # quantnpu.pipeline.Recipe (with et-*: only its rotation is used)
    strict_rotation: bool            # hadamard asked for by name: no fallback to a random orthogonal matrix
    soc: str
    calib_windows: int
    calib_text: str | None
    evaluate: bool
    eval_windows: int
    eval_text: str | None
    tokenizer: str | None
    encodings: str | None
    stop_after: str | None
    verify: bool
    allow_cpu_ops: bool
    check_agreement: bool
    keep_checkpoint: bool            # the user named the checkpoint: it stays after a finished run
    memory_check: bool               # stop before the passes if the estimated peak does not fit
    quiet: bool
    decode: bool = False             # a prefill + decode program instead of the forward
    prefill_tokens: int | None = None
    cache_slots: int | None = None

    @staticmethod
    def from_args(args: argparse.Namespace) -> LowerJob:
        if args.quant not in _quant_choices():
            raise QuantNpuError(f"unknown quantization config {args.quant!r}: choose one of {', '.join(_quant_choices())}")
        from quantnpu.pipeline import ROTATIONS

        if args.rotate is not None and args.rotate not in ROTATIONS:
            raise QuantNpuError(f"unknown rotation {args.rotate!r}: choose one of {', '.join(ROTATIONS)}")
        if args.encodings and args.quant != "quantnpu":
            raise QuantNpuError("--encodings needs --quant quantnpu")
        if args.decode and args.quant != "quantnpu":
            raise QuantNpuError(f"--decode needs --quant quantnpu (its encodings are applied to both graphs), not {args.quant}")
        for flag in ("--prefill-tokens", "--cache-slots"):
            value = _flag_value(args, flag)
            if value is not None:
                if not args.decode:
                    raise QuantNpuError(f"{flag} sizes the prefill + decode program: add --decode")
                check_positive(flag, value)
        check_positive("--calib-windows", args.calib_windows)
        check_positive("--eval-windows", args.eval_windows)
        from quantnpu.models.corpus import read_text_file

        for text in (args.calib_text, args.eval_text):
            if text is not None:
                read_text_file(text)  # a bad file fails now, before any expensive stage
        model = Path(args.model)
        plan = plan_from_args(args)
        label = f"quantnpu-{plan.name.split()[0]}" if plan is not None else args.quant
        output = Path(args.output) if args.output else model.with_name(f"{model.stem}.{label}.pte")
        if output.suffix != ".pte":
            raise QuantNpuError(f"{output}: the output must end in .pte")
        from quantnpu.lowering.soc import soc_model

        soc_model(args.soc)  # validates the name
        recipe = recipe_from_args(args, plan, output)
        return LowerJob(
            model=model, output=output, record=Path(args.record) if args.record else output.with_suffix(".json"),
            quant=args.quant, plan=plan, recipe=recipe, strict_rotation=args.rotate == "hadamard", soc=args.soc,
            calib_windows=args.calib_windows, calib_text=args.calib_text, evaluate=args.eval, eval_windows=args.eval_windows,
            eval_text=args.eval_text, tokenizer=args.tokenizer, encodings=args.encodings, stop_after=args.stop_after,
            verify=not args.no_verify, allow_cpu_ops=args.allow_cpu_ops, check_agreement=args.check_agreement,
            keep_checkpoint=args.checkpoint is not None, memory_check=not args.no_memory_check, quiet=args.quiet,
            decode=args.decode, prefill_tokens=args.prefill_tokens, cache_slots=args.cache_slots)


# ---- the stages ---------------------------------------------------------------------------------

def join_ranks(job: LowerJob) -> int:
    """Under torchrun: join the process group (stage one splits its steps over the ranks); the rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if job.plan is None or job.recipe.stage_one is None:
        raise QuantNpuError("torchrun runs stage one on several processes: give --optimize (not none) with --quant quantnpu")
    from quantnpu.distributed import init_from_env

    return init_from_env()[0]


def load_tokenizer(directory: str | None):
    if directory is None:
        from quantnpu.models.smollm2 import load_tokenizer as smollm2_tokenizer

        return smollm2_tokenizer()
    from transformers import AutoTokenizer

    if not Path(directory).is_dir():
        raise QuantNpuError(f"{directory}: tokenizer directory not found")
    files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((Path(directory) / name).is_file() for name in files):
        raise QuantNpuError(f"{directory}: no tokenizer in this folder (none of {', '.join(files)})")
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantNpuError(f"{directory}: cannot load its tokenizer ({first_line})") from None


def output_vocab(gm, path: Path) -> int:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    value = values[0].meta.get("val") if hasattr(values[0], "meta") else None
    if value is None or value.dim() != 3:
        raise QuantNpuError(f"{path}: the program must return logits [batch, seq, vocab]")
    return int(value.shape[-1])


@dataclass
class Loaded:
    """The input program and what is read from it (with --decode, the two graphs' sizes)."""

    gm: object
    batch: int
    seq_len: int
    tokenizer: object
    vocab: int = 0
    prefill_tokens: int = 0
    cache_slots: int = 0


def decode_sizes(job: LowerJob, seq_len: int, path: Path) -> tuple[int, int]:
    """(P, C) of the prefill + decode program: the flags' or the defaults, checked against the
    exported length (a position beyond it has no RoPE row)."""
    slots = job.cache_slots if job.cache_slots is not None else seq_len - 1
    if slots + 1 > seq_len:
        raise QuantNpuError(f"{path}: --cache-slots {slots} and one decode token reach position {slots}, beyond the "
                            f"exported {seq_len} positions: at most {seq_len - 1}, or export with a longer --seq-len")
    prefill = job.prefill_tokens if job.prefill_tokens is not None else slots
    if prefill > slots:
        raise QuantNpuError(f"--prefill-tokens {prefill}: the prefill writes its K/V into the cache of {slots} slots: "
                            f"at most {slots}")
    return prefill, slots


def load(job: LowerJob, stages: Stages) -> Loaded:
    from quantnpu.models.export import load_pt2, token_input_spec

    program = stages.run("load", lambda: load_pt2(job.model))
    batch, seq_len = token_input_spec(program, job.model)
    if job.evaluate and batch != 1:
        raise QuantNpuError(f"{job.model}: --eval needs a batch-1 program, this one has batch {batch}")
    gm = program.module()
    tokenizer = load_tokenizer(job.tokenizer)
    vocab = output_vocab(gm, job.model)
    if len(tokenizer) > vocab:
        raise QuantNpuError(f"{job.model}: the model predicts {vocab} tokens but the tokenizer has {len(tokenizer)}; "
                            "pass --tokenizer with the model's own tokenizer")
    loaded = Loaded(gm, batch, seq_len, tokenizer, vocab)
    if job.decode:
        if batch != 1:
            raise QuantNpuError(f"{job.model}: --decode needs a batch-1 program, this one has batch {batch}")
        loaded.prefill_tokens, loaded.cache_slots = decode_sizes(job, seq_len, job.model)
    return loaded


def estimate(job: LowerJob, loaded: Loaded):
    """The model's size and the run's estimated peak and time, printed; a run that would not fit stops here."""
    from quantnpu.estimate import check_fits, estimate_run, model_size

    size = model_size(loaded.gm, loaded.vocab, loaded.batch, loaded.seq_len)
    stages = ["passes"] if job.stop_after else ["passes", "lower prefill + decode" if job.decode else "lower"]
    if job.evaluate and not job.stop_after:
        stages += ["eval float", "eval fake-quant", "eval .pte"]
    guess = estimate_run(size, stages, job.calib_windows, job.eval_windows)
    if not job.quiet:
        print(guess.line(), flush=True)
    if job.memory_check:
        check_fits(guess, str(job.model))
    return guess


def calibration_batches(job: LowerJob, loaded: Loaded) -> list:
    from quantnpu.models.corpus import windows_for

    calibration = windows_for(loaded.tokenizer, job.calib_text, "calibration", loaded.seq_len, job.calib_windows * loaded.batch)
    return list(calibration.reshape(-1, loaded.batch, loaded.seq_len))


def run_passes(job: LowerJob, gm, batches: list, stages: Stages, rank: int):
    """(the passes, their manager, the graph they returned)."""
    from quantnpu.passes import PassManager
    from quantnpu.pipeline import pipeline

    from quantnpu.pipeline import fake_quant_end

    passes = pipeline(job.plan if job.plan is not None else job.quant, batches, job.recipe, soc=job.soc,
                      strict=job.strict_rotation, progress=not job.quiet)
    stop = job.stop_after
    if job.decode and stop is None:  # the prefill and decode graphs are derived from the fake-quant graph
        stop = fake_quant_end(passes)
    # under torchrun the other ranks only help with stage one; rank 0 does everything else
    manager = PassManager(passes, stop_after="LearnEncodings" if rank else stop,
                          progress=not job.quiet and rank == 0, verify=job.verify)
    quantized = stages.run("passes", lambda: manager.run(gm))
    return passes, manager, quantized


def quantnpu_record(job: LowerJob, passes, quantized, table) -> dict:
    """The run record's fields for static encodings (and the encodings file, if asked for).
    `quantized`: a converted (Q/DQ) graph; `table`: the encodings (EncodingTable) the program uses."""
    from quantnpu.passes import AssignBitWidths, FuseRotations, PlanBitWidths, SmoothUnrotatedInputs, SplitLeadingTokens, StaticCalibration
    from quantnpu.passes.learn_encodings import LearnEncodings
    from quantnpu.passes.round_weights import RoundWeightsGptq
    from quantnpu.pipeline import find_pass
    from quantnpu.quantizers.encodings import write_encodings
    from quantnpu.report import linear_bit_grid

    say = (lambda text: None) if job.quiet else print
    deviations = find_pass(passes, PlanBitWidths).deviations
    assign = find_pass(passes, AssignBitWidths)
    if assign is not None:
        promoted = [s for s in assign.sensitivities if s.promoted]
        say(f"mixed precision: {len(promoted)} of {len(assign.sensitivities)} down_proj inputs at 16 bits: "
            + ", ".join(f"{s.role} (r = {s.r:.3f})" for s in promoted))
    if deviations:
        say(f"HTP legalization raised {len(deviations)} bit width(s) of the plan, e.g. {deviations[0]}")
    learned = find_pass(passes, LearnEncodings)
    if learned is not None:
        say(learned.report())
    extra = {"bits": job.plan.name.split()[0], "htp_deviations": [asdict(d) for d in deviations], "linear_bits": linear_bit_grid(quantized),
             "encodings": {"activations": len(table.activations), "params": len(table.params), "requantized_inputs": len(table.edges)}}
    if assign is not None:
        extra["mixed_precision"] = {"fraction": job.recipe.promote_fraction, "down_proj_inputs": [asdict(s) for s in assign.sensitivities]}
    if learned is not None and learned.history:
        extra["stage_one"] = {**asdict(learned.config), **learned.summary(),
                              "learned_encodings_kept": find_pass(passes, StaticCalibration).learned_used}
    smoothing = find_pass(passes, SmoothUnrotatedInputs)
    if smoothing is not None and smoothing.layers:
        say(smoothing.report())
        extra["smoothing"] = {**asdict(smoothing.config), "layers": [
            {"role": layer.role, "alpha": layer.alpha, "factor_min": float(layer.factors.min()), "factor_max": float(layer.factors.max())}
            for layer in smoothing.layers]}
    split = find_pass(passes, SplitLeadingTokens)
    if split is not None and split.layers:
        chosen = [s for s in split.layers if s.split]
        say(f"leading-token split: {len(chosen)} of {len(split.layers)} MLPs give the first {split.config.tokens} token(s) "
            f"their own copy: " + (", ".join(f"layers.{s.layer} ({s.ratio:.1f}x)" if s.ratio == s.ratio else f"layers.{s.layer}"
                                             for s in chosen) or "none"))
        extra["leading_split"] = {**asdict(split.config), "layers": [asdict(s) for s in split.layers]}
    gptq = find_pass(passes, RoundWeightsGptq)
    if gptq is not None:
        if gptq.layers:
            say(gptq.report().splitlines()[-1])
        extra["weight_rounding"] = {"method": "gptq", "max_bits": gptq.max_bits, "weights": [asdict(r) for r in gptq.layers]}
    rotations = find_pass(passes, FuseRotations)
    if rotations is not None and rotations.skipped_r1:
        extra["r1_skipped"] = rotations.skipped_r1
    if job.encodings:
        extra["encodings_file"] = str(write_encodings(job.encodings, table))
        print(f"encodings: {job.encodings} ({len(table.activations)} activations, {len(table.params)} parameters, "
              f"{len(table.edges)} re-quantizing readers)")
    return extra


def evaluation_windows(job: LowerJob, loaded: Loaded):
    from quantnpu.models.corpus import windows_for

    return windows_for(loaded.tokenizer, job.eval_text, "evaluation", loaded.seq_len, job.eval_windows)


def evaluate_float(job: LowerJob, loaded: Loaded, stages: Stages):
    """The input graph's perplexity, measured before the passes rewrite it (no copy of the model kept for it)."""
    from quantnpu.runtime_harness.perplexity import perplexity

    windows = evaluation_windows(job, loaded)
    return stages.run("eval float", lambda: perplexity(loaded.gm, windows, "float graph", not job.quiet))


def pte_forward(job: LowerJob, pte_path: Path):
    """`ids [1, S] -> logits [1, S, V]` of the written program: its forward method, or with --decode
    the prefill and then one decode step per token through the KV cache (teacher forcing)."""
    if not job.decode:
        from quantnpu.runtime_harness.pte import PteModel

        return PteModel(pte_path)
    from quantnpu.runtime_harness.generate import Generator
    from quantnpu.runtime_harness.pte import CachedPte

    generator = Generator(CachedPte(pte_path), tokenizer=None)
    return lambda ids: generator.prompt_logits(ids[0].tolist())[None]


def lower_decode(job: LowerJob, loaded: Loaded, fake_quant, stages: Stages):
    """The prefill + decode Q/DQ graphs (one set of encodings) lowered into one .pte: (pair, lowered)."""
    from quantnpu.lowering.cached import lower_cached_to_qnn
    from quantnpu.passes.decode_quant import convert_cached
    from quantnpu.runtime_harness.generate import model_eos_ids

    pair = stages.run("prefill + decode graphs", lambda: convert_cached(fake_quant, loaded.prefill_tokens, loaded.cache_slots,
                                                                        soc=job.soc))
    eos = model_eos_ids(loaded.tokenizer, tokenizer_dir(job.tokenizer))
    lowered = stages.run("lower", lambda: lower_cached_to_qnn(pair, job.output, job.soc, loaded.vocab, eos))
    return pair, lowered


def tokenizer_dir(directory: str | None) -> Path:
    """The folder of the tokenizer (and the model's generation config): --tokenizer's, or SmolLM2's."""
    if directory is not None:
        return Path(directory)
    from quantnpu.models.smollm2 import smollm2_cache_dir

    return smollm2_cache_dir()


def evaluate(job: LowerJob, loaded: Loaded, float_result, quantized, pte_path: Path, stages: Stages) -> dict:
    """Perplexity of the Q/DQ graph and the .pte on the float graph's windows; prints the table."""
    from quantnpu.runtime_harness.perplexity import perplexity

    windows = evaluation_windows(job, loaded)
    progress = not job.quiet
    results = {
        "float_graph": float_result,
        "fake_quant": stages.run("eval fake-quant", lambda: perplexity(quantized, windows, "Q/DQ graph", progress)),
        "pte_htp_simulator": stages.run("eval .pte", lambda: perplexity(pte_forward(job, pte_path), windows, ".pte on HTP simulator", progress)),
    }
    print(f"\n{'':<22}{'ppl':>10}   ({job.eval_windows} windows x {loaded.seq_len} tokens of {job.eval_text or 'Brown evaluation'})")
    for name, result in results.items():
        print(f"{_RESULT_NAMES[name]:<22}{result.ppl:10.3f}   ({result.seconds:.1f} s)")
    return results


def check_agreement(job: LowerJob, quantized, batches: list, stages: Stages):
    from quantnpu.runtime_harness.agreement import check_agreement as run_check

    agreement = stages.run("check agreement", lambda: run_check(
        quantized, (batches[0],), job.output.with_name(job.output.stem + ".taps.pte"), job.soc))
    print("\n" + agreement.per_layer())
    return agreement


def lower(job: LowerJob) -> int:
    """Every stage of `quantnpu lower`, in order; the exit code."""
    stages = Stages(job.quiet)
    rank = join_ranks(job)
    from quantnpu.lowering import qnn_sdk

    loaded = load(job, stages)
    guess = estimate(job, loaded)
    sdk = qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())
    batches = calibration_batches(job, loaded)
    # the input graph's perplexity now, before the passes rewrite it in place (no copy of the model)
    float_result = evaluate_float(job, loaded, stages) if job.evaluate and not job.stop_after and not rank else None
    passes, manager, quantized = run_passes(job, loaded.gm, batches, stages, rank)
    loaded.gm = None  # the passes rewrote it into `quantized`; what they replaced is freed with it
    if rank:
        return 0
    if not job.quiet:
        print(manager.report())
    if job.stop_after:
        from quantnpu.graph.text import graph_text

        print(graph_text(quantized))
        return 0
    stage_one = job.recipe.stage_one if job.plan is not None else None
    pass_records = list(manager.records)
    if job.decode:
        pair, lowered = lower_decode(job, loaded, quantized, stages)
        extra = quantnpu_record(job, passes, pair.prefill.module, pair.encodings)
        extra["decode"] = {**lowered.metadata, "quantized_io": lowered.quantized_io, "checked_tensors": pair.checked}
        del pair
        print(f"wrote {lowered.pte_path} ({lowered.size_bytes / 2**20:.1f} MiB; methods prefill ({lowered.metadata['prefill_tokens']} "
              f"tokens) and decode (1 token, {lowered.metadata['cache_slots']} cache slots), "
              f"{sum(lowered.delegates.values())} QNN delegates)")
        if job.evaluate or job.check_agreement:  # the full-sequence Q/DQ graph, for its perplexity and the taps
            from quantnpu.passes import PassManager
            from quantnpu.pipeline import fake_quant_end

            finish = PassManager(passes, verify=False)
            quantized = stages.run("convert full sequence", lambda: finish.run(quantized, start_after=fake_quant_end(passes)))
            pass_records += finish.records
    else:
        from quantnpu.lowering.lower import lower_to_qnn
        from quantnpu.passes.convert import ENCODINGS_META

        extra = quantnpu_record(job, passes, quantized, quantized.meta[ENCODINGS_META]) if job.plan is not None else {}
        lowered = stages.run("lower", lambda: lower_to_qnn(quantized, (batches[0],), job.output, job.soc, job.allow_cpu_ops))
        print(f"wrote {lowered.pte_path} ({lowered.size_bytes / 2**20:.1f} MiB, {lowered.delegates} QNN delegate(s)"
              + (f", {len(lowered.outside_delegates)} op(s) on CPU" if lowered.outside_delegates else "") + ")")
    if stage_one is not None and not job.keep_checkpoint:
        Path(stage_one.checkpoint).unlink(missing_ok=True)  # finished: the default checkpoint has served
    record = {
        "tool": "quantnpu-lower", "model": str(job.model), "pte": str(lowered.pte_path),
        "quant": job.quant, "recipe": job.recipe.as_dict() if job.plan is not None else {"rotate": job.recipe.rotate},
        "rotate": job.recipe.rotate, "soc": job.soc, "seq_len": loaded.seq_len, "batch": loaded.batch,
        "calibration": {"text": job.calib_text or "brown calibration split", "windows": job.calib_windows},
        "qnn_sdk": str(sdk.root), "delegates": lowered.delegates, **extra,
        "passes": [{"name": r.name, "seconds": round(r.seconds, 3), "peak_memory_mib": r.peak_memory_mib,
                    "function_difference": r.function_difference, "summary": r.summary} for r in pass_records],
        "outside_delegates": lowered.outside_delegates, "pte_bytes": lowered.size_bytes,
        "estimate": {"parameters": guess.size.parameters, "peak_mib": {k: round(v, 1) for k, v in guess.peak_mib.items()},
                     "seconds": {k: round(v, 1) for k, v in guess.seconds.items()}},
    }
    results = None
    if job.evaluate:
        results = evaluate(job, loaded, float_result, quantized, lowered.pte_path, stages)
        record["evaluation"] = {"text": job.eval_text or "brown evaluation split", "windows": job.eval_windows,
                                **{k: v.as_dict() for k, v in results.items()}}
    agreement = None
    if job.check_agreement:
        agreement = check_agreement(job, quantized, batches, stages)
        record["agreement"] = {"ok": agreement.ok, "summary": agreement.summary(), "tolerance": agreement.tolerance,
                               "unobserved": len(agreement.unobserved), "tensors": [asdict(t) for t in agreement.tensors]}
    record["seconds"] = stages.seconds
    record["stage_peak_memory_mib"] = stages.peak_mib
    record["stage_resident_after_mib"] = stages.resident_after_mib
    from quantnpu.runtime_harness.records import write_record

    record_path = write_record(job.record, record)
    print(f"record: {record_path}")
    print(f".pte: {lowered.pte_path}")
    if results is not None:
        print(f"ppl on the HTP simulator: {results['pte_htp_simulator'].ppl:.3f}")
    if agreement is not None:
        print(agreement.summary(), file=sys.stdout if agreement.ok else sys.stderr)
        if not agreement.ok:
            return 3
    return 0


def main(argv=None) -> int:
    from quantnpu.cli.common import run_quietly
    from quantnpu.logs import quiet_backends

    argv = list(sys.argv[1:] if argv is None else argv)
    with quiet_backends(verbose="-v" in argv or "--verbose" in argv):
        parser = lower_parser()  # its choices import torchao, which logs at import time
    return run_quietly(lambda args: lower(LowerJob.from_args(args)), parser.parse_args(argv))
