"""Command-line tools: `quantnpu-lower` (tools/lower.py) and `quantnpu-export` (tools/export.py).

Every user error is one line on stderr (exit 2); Ctrl-C exits 130 and leaves no partial file.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from quantnpu.errors import Interrupted, QuantNpuError

EXPORT_MODELS = ("smollm2", "tiny-llama", "tiny-qwen2")
DEFAULT_BITS = "4-8-8"
DEFAULT_SMOOTH = "search"  # bench/results/smoothing.md: the best all-8-bit 8-8-8 row
DEFAULT_WEIGHT_ROUNDING = "gptq"  # bench/results/smoothing.md: 4-8-8 + 10% 238.9 -> 120.5 without smoothing
DEFAULT_SPLIT_LEADING = "auto"  # bench/results/smoothing.md: 8-8-8 all-8-bit with smoothing search 66.6 -> 55.9
SMOLLM2_VOCAB = 49152


class _Stages:
    """Prints `[stage] ... seconds` lines and keeps the timings for the run record."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    def run(self, name: str, work: Callable):
        if not self.quiet:
            print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        result = work()
        self.seconds[name] = round(time.perf_counter() - start, 3)
        if not self.quiet:
            print(f"[{name}] done in {self.seconds[name]:.1f} s", flush=True)
        return result


def _guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return run(args)
    except Interrupted as error:
        print(f"\n{error}", file=sys.stderr)
        return 130
    except QuantNpuError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def _lower_parser() -> argparse.ArgumentParser:
    from quantnpu.passes.learn_encodings import INITS, LOSSES, OPTIMIZE, SIMULATIONS, StageOneConfig
    from quantnpu.passes.round_weights import WEIGHT_ROUNDING
    from quantnpu.passes.smooth_inputs import SMOOTH_MODES, SmoothingConfig
    from quantnpu.passes.split_leading_tokens import SPLIT_MODES, LeadingTokenSplit
    from quantnpu.quantizers.et_qnn import ET_CONFIGS

    _STAGE_ONE = StageOneConfig()

    parser = argparse.ArgumentParser(
        prog="quantnpu-lower",
        description="Quantize a decoder LM .pt2 (input_ids -> logits) and lower it to a QNN HTP .pte.",
    )
    parser.add_argument("model", help="a .pt2 written by torch.export.save (e.g. by quantnpu-export)")
    parser.add_argument("-o", "--output", help="the .pte to write (default: <model>.<quant>.pte beside the model)")
    parser.add_argument("--quant", default="quantnpu", help="quantnpu (static encodings from the bit plan, QuantNpuQuantizer; the default) "
                        f"or ExecuTorch's QnnQuantizer for comparison: {', '.join('et-' + c for c in ET_CONFIGS)}")
    parser.add_argument("--bits", default=DEFAULT_BITS, help=f"quantnpu bit plan W-A-KV: 8-8-8, 4-8-8 (default {DEFAULT_BITS}) or 4-4-8 (4-bit activations are fake-quant only)")
    parser.add_argument("--override", action="append", default=[], metavar="PATTERN=BITS",
                        help="bit plan override, repeatable, e.g. '*.down_proj.input=16' (patterns match tensor labels and node names)")
    parser.add_argument("--promote-fraction", type=float, default=0.1, metavar="P",
                        help="mixed precision: the fraction of layers whose down_proj input, ranked by its 8-bit error on the "
                        "calibration set, is promoted to 16 bits (default 0.1: 3 of 30; 0 turns it off); --override still wins")
    stage = parser.add_argument_group(
        "stage one", "learn the linears' scales with R1/R2 before static calibration (quantnpu only; METHOD.md 'Stage one'). "
        "The exported program fixes batch and sequence length: a step runs --step-windows windows one after another "
        "(batch x accumulation); under torchrun they are split across ranks")
    stage.add_argument("--optimize", choices=OPTIMIZE, default=None,
                       help="selective (the default with --quant quantnpu: rotated linear inputs and all layer weights), "
                            "joint (every linear input and weight, lm_head too), rotations (R1/R2 only), none (static only)")
    stage.add_argument("--steps", type=int, default=_STAGE_ONE.steps, help=f"optimizer steps (default {_STAGE_ONE.steps}: ~2 min at 128 tokens on 2 cores)")
    stage.add_argument("--step-windows", type=int, default=_STAGE_ONE.batch, metavar="N", help=f"calibration windows per step (default {_STAGE_ONE.batch})")
    stage.add_argument("--local-steps", type=int, default=None, metavar="T", help="steps with the local quantization-error loss (default: a quarter of --steps)")
    stage.add_argument("--local-weight", type=float, default=_STAGE_ONE.local_weight, metavar="LAMBDA", help=f"weight of the local loss (default {_STAGE_ONE.local_weight})")
    stage.add_argument("--lr-rotation", type=float, default=_STAGE_ONE.lr_rotation,
                       help=f"Cayley SGD lr of R1/R2 (default {_STAGE_ONE.lr_rotation}, the paper's; 2.0 measured better with 4-bit weights, worse at 8-8-8)")
    stage.add_argument("--lr-scale", type=float, default=_STAGE_ONE.lr_scale,
                       help=f"SGD lr of the scales, relative to each scale's size (default {_STAGE_ONE.lr_scale})")
    stage.add_argument("--momentum", type=float, default=_STAGE_ONE.momentum, help=f"momentum of both optimizers (default {_STAGE_ONE.momentum})")
    stage.add_argument("--loss", choices=LOSSES, default=_STAGE_ONE.loss, help="ce: next-token cross-entropy (default); kl: KL to the float model's logits")
    stage.add_argument("--init", choices=INITS, default=_STAGE_ONE.init, help="initial scales: rule (rotation-and-bit-width-aware; default) or maxmin")
    stage.add_argument("--simulate", choices=SIMULATIONS, default=_STAGE_ONE.simulate,
                       help="static (default) or dynamic (per-token activations while learning, SpinQuant's way; their static encodings come from stage two)")
    stage.add_argument("--checkpoint", metavar="FILE", help="stage-one checkpoint (default: beside the output, removed after a finished run)")
    stage.add_argument("--checkpoint-every", type=int, default=_STAGE_ONE.checkpoint_every, metavar="N", help=f"steps between checkpoints (default {_STAGE_ONE.checkpoint_every})")
    stage.add_argument("--resume", action="store_true", help="continue stage one from the checkpoint (same command otherwise)")
    beyond = parser.add_argument_group("beyond the paper", "static smoothing of the unrotated linear inputs and GPTQ rounding of the narrow weights (bench/results/smoothing.md)")
    beyond.add_argument("--smooth", choices=SMOOTH_MODES, default=None,
                        help=f"per-channel smoothing of down_proj's and o_proj's inputs, folded into up/down and v/o: off, fixed (one alpha), "
                             f"search (per layer, by the linear's quantized output error), global (one alpha, by the quantized model's "
                             f"calibration KL), learn (search, then learned in stage one) (default {DEFAULT_SMOOTH})")
    beyond.add_argument("--smooth-alpha", type=float, default=SmoothingConfig.alpha, metavar="A",
                        help=f"migration strength of --smooth fixed, in [0, 1] (default {SmoothingConfig.alpha})")
    beyond.add_argument("--weight-rounding", choices=WEIGHT_ROUNDING, default=None,
                        help="nearest or gptq: the weights of at most --gptq-bits bits re-rounded with the calibration inputs, same scales "
                             f"(default {DEFAULT_WEIGHT_ROUNDING})")
    beyond.add_argument("--gptq-bits", type=int, default=4, choices=(4, 8), help="GPTQ rounds weights of at most this many bits (default 4)")
    beyond.add_argument("--split-leading", choices=SPLIT_MODES, default=None,
                        help="give the first --leading-tokens positions their own copy of an MLP, with encodings of its own (exact in "
                             "float; the attention sink's huge values then stop setting the other tokens' scales): off, auto (the MLPs where those positions "
                             f"are over {LeadingTokenSplit.threshold:g}x larger than the rest on the calibration set), all "
                             f"(default {DEFAULT_SPLIT_LEADING})")
    beyond.add_argument("--leading-tokens", type=int, default=LeadingTokenSplit.tokens, metavar="N",
                        help=f"how many leading positions --split-leading separates (default {LeadingTokenSplit.tokens})")
    parser.add_argument("--encodings", help="write the encodings (AIMET-style JSON) to this file")
    parser.add_argument("--soc", default="SM8650", help="Qualcomm SoC to compile for (default SM8650, Snapdragon 8 Gen 3)")
    parser.add_argument("--rotate", default=None, help="R1/R2 rotations fused into the weights: hadamard (random Hadamard; the default, "
                        "falling back to a random orthogonal matrix with a warning for sizes with no Hadamard construction, "
                        "which is an error when hadamard is asked for explicitly), random (random orthogonal), none")
    parser.add_argument("--calib-windows", type=int, default=16, help="calibration windows (of the model's sequence length)")
    parser.add_argument("--calib-text", metavar="FILE", help="calibrate on this text (plain UTF-8, or .jsonl with a 'text' field) instead of Brown's calibration split")
    parser.add_argument("--eval-text", metavar="FILE", help="evaluate on this text (plain or .jsonl) instead of Brown's evaluation split")
    parser.add_argument("--eval", action="store_true", help="also measure perplexity: float graph, fake-quant graph, and the .pte on the HTP simulator")
    parser.add_argument("--eval-windows", type=int, default=2, help="evaluation windows (each takes ~30 s on the simulator for SmolLM2 at 128 tokens)")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer directory for the calibration/eval text (default: SmolLM2's)")
    parser.add_argument("--stop-after", metavar="PASS", help="stop the pipeline after this pass (any of them, e.g. AnnotateRoles, StaticCalibration) and print the graph")
    parser.add_argument("--no-verify", action="store_true", help="skip the check that the float passes keep the input graph's function "
                        "(on seeded random ids); only for a graph you know the verifier cannot run")
    parser.add_argument("--allow-cpu-ops", action="store_true", help="accept ops left outside QNN delegates")
    parser.add_argument("--check-agreement", action="store_true",
                        help="after lowering, run a copy of the program that also returns every quantized tensor on the HTP "
                             "simulator (one calibration window) and compare each with its op recomputed in the Q/DQ graph "
                             "from the device's own inputs; prints the largest difference per layer, exit code 3 if any "
                             "tensor is over 2 8-bit steps' worth")
    parser.add_argument("--record", help="JSON record of the run (default: <output>.json)")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="show ExecuTorch's and QNN's own log lines")
    return parser


def _stage_one_config(args: argparse.Namespace, plan, output: Path):
    """The StageOneConfig the flags ask for, or None (no stage one)."""
    from quantnpu.passes.learn_encodings import StageOneConfig

    if plan is None:
        if args.optimize not in (None, "none") or args.resume:
            raise QuantNpuError(f"--optimize/--resume belong to --quant quantnpu, not {args.quant}")
        return None
    optimize = args.optimize or "selective"
    if optimize == "none":
        if args.resume:
            raise QuantNpuError("--resume needs stage one (--optimize other than none)")
        return None
    checkpoint = args.checkpoint or str(output.with_suffix(".stage1.ckpt"))
    if args.resume and not Path(checkpoint).is_file():
        raise QuantNpuError(f"--resume: no stage-one checkpoint at {checkpoint}")
    return StageOneConfig(
        optimize=optimize, steps=args.steps, batch=args.step_windows, local_steps=args.local_steps,
        local_weight=args.local_weight, lr_rotation=args.lr_rotation, lr_scale=args.lr_scale, momentum=args.momentum,
        loss=args.loss, init=args.init, simulate=args.simulate, checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every, resume=args.resume)


def _smoothing_config(args: argparse.Namespace, plan, stage_one):
    """The SmoothingConfig of the flags, or None; combinations that cannot work are errors now."""
    if plan is None:
        if args.smooth is not None or args.weight_rounding is not None:
            raise QuantNpuError("--smooth/--weight-rounding belong to --quant quantnpu")
        return None
    args.smooth = args.smooth or DEFAULT_SMOOTH
    args.weight_rounding = args.weight_rounding or DEFAULT_WEIGHT_ROUNDING
    if args.smooth == "learn" and stage_one is None:
        raise QuantNpuError("--smooth learn learns the factors in stage one: add --optimize selective (or joint)")
    if args.smooth == "off":
        return None
    from quantnpu.passes.smooth_inputs import SmoothingConfig

    return SmoothingConfig(mode=args.smooth, alpha=args.smooth_alpha)


def _leading_split(args: argparse.Namespace, plan):
    """The LeadingTokenSplit of the flags, or None (quantnpu's own plans only)."""
    if plan is None:
        if args.split_leading is not None:
            raise QuantNpuError("--split-leading belongs to --quant quantnpu")
        return None
    args.split_leading = args.split_leading or DEFAULT_SPLIT_LEADING
    from quantnpu.passes.split_leading_tokens import LeadingTokenSplit

    return LeadingTokenSplit(mode=args.split_leading, tokens=args.leading_tokens)


def _join_ranks(stage_one) -> int:
    """Under torchrun: join the process group (stage one splits its steps over the ranks); the rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if stage_one is None:
        raise QuantNpuError("torchrun runs stage one on several processes: give --optimize (not none) with --quant quantnpu")
    from quantnpu.distributed import init_from_env

    return init_from_env()[0]


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise QuantNpuError(f"{name} must be a positive number, got {value}")


def _quant_choices() -> list[str]:
    from quantnpu.quantizers.et_qnn import ET_CONFIGS

    return ["quantnpu"] + [f"et-{c}" for c in ET_CONFIGS]


def _lower(args: argparse.Namespace) -> int:
    if args.quant not in _quant_choices():
        raise QuantNpuError(f"unknown quantization config {args.quant!r}: choose one of {', '.join(_quant_choices())}")
    plan = None
    if args.quant == "quantnpu":
        from quantnpu.quantizers.bit_plan import BitPlan

        plan = BitPlan.parse(args.bits, args.override)
        low_activation = [p for p, bits in plan.overrides if bits < 8 and not p.endswith(".weight")]
        if plan.activations < 8 or low_activation:
            raise QuantNpuError(f"--bits {plan.name}: QNN HTP runs 8- and 16-bit activations only; "
                                "4-bit activations can be evaluated as fake-quant (bench/static.py), not lowered")
    elif args.bits != DEFAULT_BITS or args.override:
        raise QuantNpuError("--bits/--override belong to --quant quantnpu")
    if not 0.0 <= args.promote_fraction <= 1.0:
        raise QuantNpuError(f"--promote-fraction must be between 0 and 1, got {args.promote_fraction}")
    if args.encodings and plan is None:
        raise QuantNpuError("--encodings needs --quant quantnpu")
    _check_positive("--calib-windows", args.calib_windows)
    from quantnpu.pipeline import ROTATIONS

    strict_hadamard = args.rotate == "hadamard"
    args.rotate = args.rotate or "hadamard"
    if args.rotate not in ROTATIONS:
        raise QuantNpuError(f"unknown rotation {args.rotate!r}: choose one of {', '.join(ROTATIONS)}")
    _check_positive("--eval-windows", args.eval_windows)
    from quantnpu.models.corpus import read_text_file

    for text in (args.calib_text, args.eval_text):
        if text is not None:
            read_text_file(text)  # a bad file fails now, before any expensive stage
    model_path = Path(args.model)
    label = f"quantnpu-{plan.name.split()[0]}" if plan is not None else args.quant
    output = Path(args.output) if args.output else model_path.with_name(f"{model_path.stem}.{label}.pte")
    if output.suffix != ".pte":
        raise QuantNpuError(f"{output}: the output must end in .pte")
    stage_one = _stage_one_config(args, plan, output)
    smoothing = _smoothing_config(args, plan, stage_one)
    leading_split = _leading_split(args, plan)
    rank = _join_ranks(stage_one)
    from quantnpu.models.export import load_pt2, token_input_spec

    stages = _Stages(args.quiet)
    program = stages.run("load", lambda: load_pt2(model_path))
    batch, seq_len = token_input_spec(program, model_path)
    if args.eval and batch != 1:
        raise QuantNpuError(f"{model_path}: --eval needs a batch-1 program, this one has batch {batch}")

    import copy

    from quantnpu.lowering import qnn_sdk
    from quantnpu.lowering.soc import soc_model

    soc_model(args.soc)  # validates the name
    sdk = qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())

    from quantnpu.models.corpus import windows_for
    from quantnpu.passes import PassManager
    from quantnpu.graph.text import graph_text
    from quantnpu.pipeline import pipeline

    gm = program.module()
    tokenizer = _tokenizer(args.tokenizer)
    vocab = _output_vocab(gm, model_path)
    if len(tokenizer) > vocab:
        raise QuantNpuError(
            f"{model_path}: the model predicts {vocab} tokens but the tokenizer has {len(tokenizer)}; "
            "pass --tokenizer with the model's own tokenizer"
        )
    calibration = windows_for(tokenizer, args.calib_text, "calibration", seq_len, args.calib_windows * batch)
    batches = list(calibration.reshape(-1, batch, seq_len))
    float_gm = copy.deepcopy(gm) if args.eval else None  # the input graph: the float reference
    passes = pipeline(plan if plan is not None else args.quant, batches, args.rotate, args.soc,
                      strict=strict_hadamard, progress=not args.quiet,
                      promote_fraction=args.promote_fraction if plan is not None else 0.0, stage_one=stage_one,
                      smoothing=smoothing, weight_rounding=args.weight_rounding or "nearest", gptq_bits=args.gptq_bits,
                      leading_split=leading_split)
    # under torchrun the other ranks only help with stage one; rank 0 does everything else
    manager = PassManager(passes, stop_after="LearnEncodings" if rank else args.stop_after,
                          progress=not args.quiet and rank == 0, verify=not args.no_verify)
    quantized = stages.run("passes", lambda: manager.run(gm))
    if rank:
        return 0
    if not args.quiet:
        print(manager.report())
    if args.stop_after:
        print(graph_text(quantized))
        return 0
    extra = _quantnpu_record(args, passes, quantized) if plan is not None else {}
    if stage_one is not None and args.checkpoint is None:
        Path(stage_one.checkpoint).unlink(missing_ok=True)  # finished: the default checkpoint has served
    from quantnpu.lowering.lower import lower_to_qnn

    lowered = stages.run("lower", lambda: lower_to_qnn(quantized, (batches[0],), output, args.soc, args.allow_cpu_ops))
    print(f"wrote {lowered.pte_path} ({lowered.size_bytes / 2**20:.1f} MiB, {lowered.delegates} QNN delegate(s)"
          + (f", {len(lowered.outside_delegates)} op(s) on CPU" if lowered.outside_delegates else "") + ")")

    record = {
        "tool": "quantnpu-lower", "model": str(model_path), "pte": str(lowered.pte_path),
        "quant": args.quant, "rotate": args.rotate, "soc": args.soc, "seq_len": seq_len, "batch": batch,
        "calibration": {"text": args.calib_text or "brown calibration split", "windows": args.calib_windows},
        "qnn_sdk": str(sdk.root), "delegates": lowered.delegates, **extra,
        "passes": [{"name": r.name, "seconds": round(r.seconds, 3), "function_difference": r.function_difference,
                    "summary": r.summary} for r in manager.records],
        "outside_delegates": lowered.outside_delegates, "pte_bytes": lowered.size_bytes,
    }
    if args.eval:
        from quantnpu.runtime_harness.perplexity import perplexity
        from quantnpu.runtime_harness.pte import PteModel

        windows = windows_for(tokenizer, args.eval_text, "evaluation", seq_len, args.eval_windows)
        progress = not args.quiet
        results = {
            "float_graph": stages.run("eval float", lambda: perplexity(float_gm, windows, "float graph", progress)),
            "fake_quant": stages.run("eval fake-quant", lambda: perplexity(quantized, windows, "Q/DQ graph", progress)),
            "pte_htp_simulator": stages.run("eval .pte", lambda: perplexity(PteModel(lowered.pte_path), windows, ".pte on HTP simulator", progress)),
        }
        record["evaluation"] = {"text": args.eval_text or "brown evaluation split", "windows": args.eval_windows,
                                **{k: v.as_dict() for k, v in results.items()}}
        print(f"\n{'':<22}{'ppl':>10}   ({args.eval_windows} windows x {seq_len} tokens of {args.eval_text or 'Brown evaluation'})")
        for name, result in results.items():
            print(f"{_RESULT_NAMES[name]:<22}{result.ppl:10.3f}   ({result.seconds:.1f} s)")
    agreement = None
    if args.check_agreement:
        from dataclasses import asdict

        from quantnpu.runtime_harness.agreement import check_agreement

        agreement = stages.run("check agreement", lambda: check_agreement(
            quantized, (batches[0],), output.with_name(output.stem + ".taps.pte"), args.soc))
        print("\n" + agreement.per_layer())
        record["agreement"] = {"ok": agreement.ok, "summary": agreement.summary(), "tolerance": agreement.tolerance,
                               "unobserved": len(agreement.unobserved),
                               "tensors": [asdict(t) for t in agreement.tensors]}
    record["seconds"] = stages.seconds
    from quantnpu.runtime_harness.records import write_record

    record_path = write_record(args.record or output.with_suffix(".json"), record)
    print(f"record: {record_path}")
    print(f".pte: {lowered.pte_path}")
    if args.eval:
        print(f"ppl on the HTP simulator: {results['pte_htp_simulator'].ppl:.3f}")
    if agreement is not None:
        print(agreement.summary(), file=sys.stdout if agreement.ok else sys.stderr)
        if not agreement.ok:
            return 3
    return 0


_RESULT_NAMES = {"float_graph": "float (input graph)", "fake_quant": "fake-quant (Q/DQ)", "pte_htp_simulator": ".pte, HTP simulator"}


def _quantnpu_record(args: argparse.Namespace, passes, quantized) -> dict:
    """The run record's fields for static encodings (and the encodings file, if asked for)."""
    from dataclasses import asdict

    from quantnpu.passes import AssignBitWidths, FuseRotations, PlanBitWidths, SmoothUnrotatedInputs, SplitLeadingTokens, StaticCalibration
    from quantnpu.passes.learn_encodings import LearnEncodings
    from quantnpu.passes.round_weights import RoundWeightsGptq
    from quantnpu.passes.convert import ENCODINGS_META
    from quantnpu.pipeline import find_pass
    from quantnpu.quantizers.encodings import write_encodings

    deviations = find_pass(passes, PlanBitWidths).deviations
    assign = find_pass(passes, AssignBitWidths)
    if assign is not None and not args.quiet:
        promoted = [s for s in assign.sensitivities if s.promoted]
        print(f"mixed precision: {len(promoted)} of {len(assign.sensitivities)} down_proj inputs at 16 bits: "
              + ", ".join(f"{s.role} (r = {s.r:.3f})" for s in promoted))
    if deviations and not args.quiet:
        print(f"HTP legalization raised {len(deviations)} bit width(s) of the plan, e.g. {deviations[0]}")
    rotations = find_pass(passes, FuseRotations)
    learned = find_pass(passes, LearnEncodings)
    if learned is not None and not args.quiet:
        print(learned.report())
    table = quantized.meta[ENCODINGS_META]
    from quantnpu.report import linear_bit_grid

    extra = {"bits": args.bits, "htp_deviations": [asdict(d) for d in deviations], "linear_bits": linear_bit_grid(quantized),
             "encodings": {"activations": len(table.activations), "params": len(table.params), "requantized_inputs": len(table.edges)}}
    if assign is not None:
        extra["mixed_precision"] = {"fraction": args.promote_fraction, "down_proj_inputs": [asdict(s) for s in assign.sensitivities]}
    if learned is not None and learned.history:
        extra["stage_one"] = {**asdict(learned.config), **learned.summary(),
                              "learned_encodings_kept": find_pass(passes, StaticCalibration).learned_used}
    smoothing = find_pass(passes, SmoothUnrotatedInputs)
    if smoothing is not None and smoothing.layers:
        if not args.quiet:
            print(smoothing.report())
        extra["smoothing"] = {**asdict(smoothing.config), "layers": [
            {"role": layer.role, "alpha": layer.alpha, "factor_min": float(layer.factors.min()), "factor_max": float(layer.factors.max())}
            for layer in smoothing.layers]}
    split = find_pass(passes, SplitLeadingTokens)
    if split is not None and split.layers:
        chosen = [s for s in split.layers if s.split]
        if not args.quiet:
            print(f"leading-token split: {len(chosen)} of {len(split.layers)} MLPs give the first {split.config.tokens} token(s) "
                  f"their own copy: " + (", ".join(f"layers.{s.layer} ({s.ratio:.1f}x)" if s.ratio == s.ratio else f"layers.{s.layer}"
                                                   for s in chosen) or "none"))
        extra["leading_split"] = {**asdict(split.config), "layers": [asdict(s) for s in split.layers]}
    gptq = find_pass(passes, RoundWeightsGptq)
    if gptq is not None:
        if not args.quiet and gptq.layers:
            print(gptq.report().splitlines()[-1])
        extra["weight_rounding"] = {"method": "gptq", "max_bits": gptq.max_bits, "weights": [asdict(r) for r in gptq.layers]}
    if rotations is not None and rotations.skipped_r1:
        extra["r1_skipped"] = rotations.skipped_r1
    if args.encodings:
        extra["encodings_file"] = str(write_encodings(args.encodings, table))
        print(f"encodings: {args.encodings} ({len(table.activations)} activations, {len(table.params)} parameters, "
              f"{len(table.edges)} re-quantizing readers)")
    return extra


def _tokenizer(directory: str | None):
    if directory is None:
        from quantnpu.models.smollm2 import load_tokenizer

        return load_tokenizer()
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


def _output_vocab(gm, path: Path) -> int:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    value = values[0].meta.get("val") if hasattr(values[0], "meta") else None
    if value is None or value.dim() != 3:
        raise QuantNpuError(f"{path}: the program must return logits [batch, seq, vocab]")
    return int(value.shape[-1])


def main(argv: Sequence[str] | None = None) -> int:
    from quantnpu.logs import quiet_backends

    argv = list(sys.argv[1:] if argv is None else argv)
    with quiet_backends(verbose="-v" in argv or "--verbose" in argv):
        parser = _lower_parser()  # its choices import torchao, which logs at import time
    return _run_quietly(_lower, parser.parse_args(argv))


def _run_quietly(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run` with backend output kept quiet unless `--verbose` (quantnpu/logs.py)."""
    from quantnpu.logs import quiet_backends

    with quiet_backends(verbose=args.verbose) as status:
        code = _guarded(run, args)
        status.failed = code != 0
    return code


def _export(args: argparse.Namespace) -> int:
    if args.hf is None and args.model not in EXPORT_MODELS:
        raise QuantNpuError(f"unknown model {args.model!r}: choose one of {', '.join(EXPORT_MODELS)}")
    _check_positive("--seq-len", args.seq_len)
    output = Path(args.output)
    if output.suffix != ".pt2":
        raise QuantNpuError(f"{output}: the output must end in .pt2")
    if output.exists() and not args.force:
        print(f"reusing {output} (use --force to export again)")
        return 0
    from quantnpu.models.export import export_causal_lm, save_pt2

    if args.hf is not None:
        from quantnpu.models.export import load_hf_model

        model = load_hf_model(args.hf)
        args.model = args.hf
    elif args.model == "smollm2":
        from quantnpu.models.smollm2 import load_smollm2

        model, _ = load_smollm2()
    else:
        from quantnpu.models import tiny

        # SmolLM2's vocabulary, so the default tokenizer and corpus work with the tiny models.
        maker = tiny.tiny_llama if args.model == "tiny-llama" else tiny.tiny_qwen2
        model = maker(vocab=SMOLLM2_VOCAB)
    start = time.perf_counter()
    save_pt2(export_causal_lm(model, args.seq_len), output)
    print(f"exported {args.model} (seq_len {args.seq_len}) to {output} in {time.perf_counter() - start:.1f} s")
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantnpu-export", description="Export a causal LM's prefill graph to .pt2.")
    parser.add_argument("--model", default="smollm2", help=f"one of {', '.join(EXPORT_MODELS)}")
    parser.add_argument("--hf", metavar="DIR", help="export this local Hugging Face model folder (config.json, safetensors) instead; "
                        "lower it with --tokenizer DIR when its tokenizer is not SmolLM2's")
    parser.add_argument("--seq-len", type=int, default=128, help="static sequence length")
    parser.add_argument("-o", "--output", required=True, help="the .pt2 to write")
    parser.add_argument("--force", action="store_true", help="export again even if the output exists")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own log lines")
    return _run_quietly(_export, parser.parse_args(argv))


def _report(args: argparse.Namespace) -> int:
    from quantnpu.report import write_report

    if args.windows < 1:
        raise QuantNpuError(f"--windows must be positive, got {args.windows}")
    path = write_report(args.record, args.output, args.model, args.layer, args.windows)
    print(f"report: {path}")
    return 0


def quantnpu_main(argv: Sequence[str] | None = None) -> int:
    """`quantnpu lower|export|report ...`: the package's commands under one name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"lower": main, "export": export_main, "report": report_main}
    if not argv or argv[0] not in commands:
        print(f"usage: quantnpu {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def report_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantnpu report", description="One HTML page about a run: figures, bit widths, ppl, timings.")
    parser.add_argument("record", help="the run record tools/lower.py wrote beside the .pte (.json)")
    parser.add_argument("-o", "--output", help="the page to write (default: beside the record, .html)")
    parser.add_argument("--model", help="the .pt2 for the activation figures (default: the record's model)")
    parser.add_argument("--layer", type=int, help="the layer of the activation figures (default: the most sensitive down_proj's)")
    parser.add_argument("--windows", type=int, default=1, help="evaluation windows for the activation figures")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own log lines")
    return _run_quietly(_report, parser.parse_args(argv))
