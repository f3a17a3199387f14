#!/usr/bin/env python3
"""Generation bench: the evidence that the prefill + decode program computes what the full-sequence
program does, and what it costs on the HTP simulator.

    python bench/generate.py [--parts families qdq pte greedy] [--bits 8-8-8] [--windows 8]
                             [--pte-windows 2] [--prompts 8] [--new-tokens 32] [--prefill-tokens 32]

- `families` (a): float prefill + decode vs the full-sequence graph, every tiny family (float64) and
  SmolLM2-135M (float32): the largest relative logit difference over a window, prompt of 4 tokens.
- `qdq` (b): teacher-forced perplexity on Brown evaluation windows (SEQ tokens) through the Q/DQ
  prefill (P tokens) and one decode step per remaining token, against the full-sequence Q/DQ graph's
  (the prefill-only program) on the same windows. Target: within 1%.
- `pte` (b): the same through the `.pte` on the HTP simulator, against the Q/DQ decode path on the same
  windows. Target: within 2%.
- `greedy` (c, d): greedy generation from the first words of Brown evaluation documents, `.pte` against
  the Q/DQ graphs through the same cache loop (the fake-quant model's integer function): the share of
  identical tokens and, at the first divergence, both models' top-2 logit margins; seconds per prompt
  token and per decode step on the simulator.

SmolLM2-135M (`make run`'s export) through the shipped recipe, made by the one pipeline
(`quantnpu.pipeline.pipeline`) and converted/lowered by `convert_cached` / `lower_cached_to_qnn`, the
functions `tools/lower.py --decode` calls. Writes bench/results/generate.{json,md} (each part replaces its
own entry; the command is kept with it).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import RESULTS, git_state  # noqa: E402

PARTS = ("families", "qdq", "pte", "greedy")
OUT = RESULTS / "generate.json"


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def families_part(prefill_tokens: int) -> dict:
    import torch

    from quantnpu.graph.decode import KvCacheRunner, derive_decode, derive_prefill
    from quantnpu.graph.equivalence import as_float64, sample_token_ids
    from quantnpu.models.export import export_causal_lm, load_pt2
    from quantnpu.models.tiny import FAMILIES, tiny_model
    from quantnpu.passes import AnnotateRoles, Canonicalize, FoldConstants, PassManager
    from quantnpu.runtime_harness.generate import Generator

    def through_cache(gm, ids, prefill, slots):
        generator = Generator(KvCacheRunner(derive_prefill(gm, prefill), derive_decode(gm, slots)), None)
        prompt = generator.prompt_logits(ids[0, :4].tolist())  # prefill of 4 (padded), then teacher-forced steps
        rest = [generator.runner.step(ids[:, t:t + 1])[0] for t in range(4, ids.shape[1])]
        return torch.cat([prompt, *rest], 0)

    rows = {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for family in FAMILIES:
            gm = export_causal_lm(tiny_model(family, layers=2), 16).module()
            gm = PassManager([Canonicalize(), FoldConstants(), AnnotateRoles()]).run(as_float64(gm))
            ids = sample_token_ids(gm, seed=3)
            rows[family] = {"dtype": "float64", "relative_max": relative(through_cache(gm, ids, 8, 15), gm(ids)[0])}
            print(f"{family}: {rows[family]['relative_max']:.2e}", flush=True)
        program = load_pt2(ROOT / "build" / "smollm2-135m-s128.pt2").module()
        gm = PassManager([Canonicalize(), FoldConstants(), AnnotateRoles()]).run(program)
        ids = brown_windows(128, 1)
        rows["smollm2-135m"] = {"dtype": "float32", "relative_max": relative(through_cache(gm, ids, prefill_tokens, 127), gm(ids)[0])}
        print(f"smollm2-135m: {rows['smollm2-135m']['relative_max']:.2e}", flush=True)
    return {"rows": rows, "target": "relative < 1e-5"}


def brown_windows(seq_len: int, count: int):
    from quantnpu.models.corpus import windows_for
    from quantnpu.models.smollm2 import load_tokenizer

    return windows_for(load_tokenizer(), None, "evaluation", seq_len, count)


class Built:
    """SmolLM2-135M through the shipped pipeline: the fake-quant graph, its Q/DQ prefill + decode pair,
    the full-sequence Q/DQ graph and the lowered `.pte` (made once, in `work`)."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        from quantnpu.lowering import qnn_sdk
        from quantnpu.lowering.cached import lower_cached_to_qnn
        from quantnpu.models.corpus import windows_for
        from quantnpu.models.export import load_pt2
        from quantnpu.models.smollm2 import load_tokenizer, smollm2_cache_dir
        from quantnpu.passes import PassManager
        from quantnpu.passes.decode_quant import convert_cached
        from quantnpu.pipeline import fake_quant_end, pipeline
        from quantnpu.runtime_harness.generate import model_eos_ids

        qnn_sdk.activate(qnn_sdk.prepare_qnn_sdk())
        self.tokenizer = load_tokenizer()
        calibration = list(windows_for(self.tokenizer, None, "calibration", 128, args.calib_windows).reshape(-1, 1, 128))
        passes = pipeline(args.bits, calibration, progress=True)
        start = time.perf_counter()
        fake_quant = PassManager(passes, stop_after=fake_quant_end(passes), progress=True).run(
            load_pt2(ROOT / "build" / "smollm2-135m-s128.pt2").module())
        self.seconds = {"passes": time.perf_counter() - start}
        start = time.perf_counter()
        self.pair = convert_cached(fake_quant, args.prefill_tokens, 127)
        self.seconds["convert_cached"] = time.perf_counter() - start
        self.pte = work / f"smollm2-135m-{args.bits}-p{args.prefill_tokens}.pte"
        lowered = lower_cached_to_qnn(self.pair, self.pte, vocab_size=49152,
                                      eos_ids=model_eos_ids(self.tokenizer, smollm2_cache_dir()))
        self.seconds["lower"] = lowered.seconds
        self.pte_mib = lowered.size_bytes / 2**20
        start = time.perf_counter()
        self.full = PassManager(passes, verify=False).run(fake_quant, start_after=fake_quant_end(passes))
        self.seconds["convert_full"] = time.perf_counter() - start

    def qdq_generator(self):
        from quantnpu.graph.decode import KvCacheRunner
        from quantnpu.runtime_harness.generate import Generator

        return Generator(KvCacheRunner(self.pair.prefill, self.pair.decode), self.tokenizer, [2])

    def pte_generator(self):
        from quantnpu.runtime_harness.generate import Generator
        from quantnpu.runtime_harness.pte import CachedPte

        return Generator(CachedPte(self.pte), self.tokenizer, [2])


def through(generator):
    return lambda ids: generator.prompt_logits(ids[0].tolist())[None]


def qdq_part(built: Built, windows) -> dict:
    from quantnpu.runtime_harness.perplexity import perplexity

    full = perplexity(built.full, windows, "Q/DQ full sequence")
    cached = perplexity(through(built.qdq_generator()), windows, "Q/DQ prefill + decode")
    gap = abs(cached.ppl - full.ppl) / full.ppl
    print(f"Q/DQ: full {full.ppl:.3f}, prefill + decode {cached.ppl:.3f} ({gap:.3%})", flush=True)
    return {"windows": int(windows.shape[0]), "full_sequence_ppl": full.ppl, "prefill_decode_ppl": cached.ppl,
            "relative_gap": gap, "target": 0.01, "met": gap <= 0.01}


def pte_part(built: Built, windows) -> dict:
    from quantnpu.runtime_harness.perplexity import perplexity

    qdq = perplexity(through(built.qdq_generator()), windows, "Q/DQ prefill + decode")
    pte = perplexity(through(built.pte_generator()), windows, ".pte prefill + decode (HTP simulator)")
    gap = abs(pte.ppl - qdq.ppl) / qdq.ppl
    print(f".pte: {pte.ppl:.3f} vs Q/DQ decode {qdq.ppl:.3f} ({gap:.3%}), {pte.seconds:.0f} s", flush=True)
    return {"windows": int(windows.shape[0]), "qdq_prefill_decode_ppl": qdq.ppl, "pte_prefill_decode_ppl": pte.ppl,
            "relative_gap": gap, "target": 0.02, "met": gap <= 0.02, "pte_seconds": pte.seconds}


def prompts(count: int, words: int = 8) -> list[str]:
    """The first `words` words of the first `count` Brown evaluation documents."""
    from quantnpu.models.corpus import brown_split

    documents = brown_split().evaluation_text.split("\n\n")
    return [" ".join(document.split()[:words]) for document in documents[:count]]


def greedy_part(built: Built, count: int, new_tokens: int) -> dict:
    qdq, pte = built.qdq_generator(), built.pte_generator()
    rows = []
    for prompt in prompts(count):
        a = qdq.generate(prompt, new_tokens)
        b = pte.generate(prompt, new_tokens)
        same = sum(x == y for x, y in zip(a.tokens, b.tokens))
        first = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), None)
        row = {"prompt": prompt, "prompt_tokens": len(a.prompt_tokens), "qdq_text": a.text, "pte_text": b.text,
               "tokens": min(len(a.tokens), len(b.tokens)), "identical": same, "first_divergence": first,
               "pte_prompt_seconds": b.prompt_seconds, "pte_decode_seconds": b.decode_seconds, "pte_decode_steps": b.decode_steps}
        if first is not None:
            row["margins_at_divergence"] = {"qdq": a.margins[first], "pte": b.margins[first]}
        rows.append(row)
        print(f"{prompt!r}: {same}/{row['tokens']} identical" + (f", first divergence at {first} (margins Q/DQ "
              f"{a.margins[first]:.3f}, .pte {b.margins[first]:.3f})" if first is not None else ""), flush=True)
    tokens = sum(r["tokens"] for r in rows)
    decode_steps = sum(r["pte_decode_steps"] for r in rows)
    return {"prompts": rows, "identical_share": sum(r["identical"] for r in rows) / tokens,
            "seconds_per_prompt_token": sum(r["pte_prompt_seconds"] for r in rows) / sum(r["prompt_tokens"] for r in rows),
            "seconds_per_prefill_call": sum(r["pte_prompt_seconds"] for r in rows) / len(rows),
            "seconds_per_decode_step": sum(r["pte_decode_seconds"] for r in rows) / decode_steps}


def markdown(results: dict) -> str:
    lines = ["# Generation: prefill + decode against the full-sequence program", "",
             "Made by `bench/generate.py` (commands and commits below). SmolLM2-135M, shipped recipe; the `.pte` runs on the",
             "QNN HTP x86 simulator.", ""]
    parts = results.get("parts", {})
    if "families" in parts:
        part = parts["families"]
        lines += ["## (a) Float prefill + decode vs the full-sequence graph", "",
                  "Largest relative logit difference over a window (prompt of 4 tokens through the prefill, the rest teacher-forced "
                  "through decode steps).", "", "| model | dtype | relative max |", "| --- | --- | ---: |"]
        lines += [f"| {name} | {row['dtype']} | {row['relative_max']:.2e} |" for name, row in part["rows"].items()]
        lines += ["", f"`{part['command']}` at {part['commit'][:10]}", ""]
    if "qdq" in parts or "pte" in parts:
        lines += ["## (b) Teacher-forced perplexity through prefill + decode", "",
                  "| program | windows x tokens | full sequence (prefill only) | through prefill + decode | gap | target |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        seq = results.get("seq_len", 128)
        if "qdq" in parts:
            p = parts["qdq"]
            lines.append(f"| Q/DQ graphs | {p['windows']} x {seq} | {p['full_sequence_ppl']:.3f} | {p['prefill_decode_ppl']:.3f} | "
                         f"{p['relative_gap']:.3%} | <= 1% ({'met' if p['met'] else 'missed'}) |")
        if "pte" in parts:
            p = parts["pte"]
            lines.append(f"| .pte (simulator) vs Q/DQ decode | {p['windows']} x {seq} | {p['qdq_prefill_decode_ppl']:.3f} (Q/DQ decode) | "
                         f"{p['pte_prefill_decode_ppl']:.3f} | {p['relative_gap']:.3%} | <= 2% ({'met' if p['met'] else 'missed'}) |")
        for name in ("qdq", "pte"):
            if name in parts:
                lines.append(f"\n`{parts[name]['command']}` at {parts[name]['commit'][:10]}")
        lines.append("")
    if "greedy" in parts:
        p = parts["greedy"]
        lines += ["## (c) Greedy generation, `.pte` vs the Q/DQ graphs; (d) simulator seconds", "",
                  f"Identical tokens: **{p['identical_share']:.1%}**. On the simulator: {p['seconds_per_prefill_call']:.1f} s per prompt "
                  f"({p['seconds_per_prompt_token']:.2f} s per prompt token), {p['seconds_per_decode_step']:.2f} s per decode step.", "",
                  "| prompt | identical | first divergence | top-2 margin there (Q/DQ / .pte) | .pte text |", "| --- | ---: | ---: | --- | --- |"]
        for r in p["prompts"]:
            margins = r.get("margins_at_divergence")
            lines.append(f"| {r['prompt']} | {r['identical']}/{r['tokens']} | {r['first_divergence'] if r['first_divergence'] is not None else '-'} | "
                         + (f"{margins['qdq']:.3f} / {margins['pte']:.3f}" if margins else "-")
                         + f" | {r['pte_text'].replace('|', '/').replace(chr(10), ' ')} |")
        lines += ["", f"`{p['command']}` at {p['commit'][:10]}", ""]
    if "build" in results:
        lines += ["## Build", "", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["build"]["seconds"].items())
                  + f"; `.pte` {results['build']['pte_mib']:.0f} MiB (two methods, weights in each delegate).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--bits", default="8-8-8")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=32)
    parser.add_argument("--windows", type=int, default=8, help="Brown evaluation windows of the Q/DQ perplexity")
    parser.add_argument("--pte-windows", type=int, default=8, help="windows of the .pte perplexity (~8 min each)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work", default=str(ROOT / "build" / "generate"))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    command = "python bench/generate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"format": "quantnpu-generate/1", "parts": {}}
    results["seq_len"] = 128

    def save(name: str, part: dict) -> None:
        part.update(command=command, **git_state())
        results["parts"][name] = part
        out.write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(results))

    if "families" in args.parts:
        save("families", families_part(args.prefill_tokens))
    if set(args.parts) & {"qdq", "pte", "greedy"}:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        built = Built(args, Path(args.work))
        results["build"] = {"seconds": built.seconds, "pte_mib": built.pte_mib, "prefill_tokens": args.prefill_tokens,
                            "bits": args.bits, "command": command}
        windows = brown_windows(128, max(args.windows, args.pte_windows))
        if "qdq" in args.parts:
            save("qdq", qdq_part(built, windows[:args.windows]))
        if "greedy" in args.parts:  # before the long perplexity: the shorter evidence first
            save("greedy", greedy_part(built, args.prompts, args.new_tokens))
        if "pte" in args.parts:
            save("pte", pte_part(built, windows[:args.pte_windows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
