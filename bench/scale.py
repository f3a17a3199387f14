#!/usr/bin/env python3
"""Scale bench: peak resident memory and seconds of every stage, for decoders of the real sizes.

Rows are shapes of `quantnpu.models.shapes` (published configurations, seeded random weights whose scale
is SmolLM2-135M's): `smollm2-135m`, `smollm2-360m`, `qwen2.5-0.5b`, `llama-3.2-1b`, `smollm2-1.7b`, and
`smollm2-135m-real`, SmolLM2-135M-Instruct's trained weights (`tools/export.py --model smollm2`), which says
whether random weights cost what trained ones do (the default rows); `tiny` (2 layers, hidden 64) checks
the bench itself (measure it into another `--out`). Each row runs in its own process (bench/harness.py)
the commands a user runs, each one a child process of its own:

    python -m quantnpu.models.shapes write SHAPE WORK/SHAPE-seedS --seed S     (only if the folder is missing)
    python tools/export.py --hf WORK/SHAPE-seedS --seq-len N -o WORK/SHAPE-seedS-sN.pt2 --force
    python tools/lower.py WORK/SHAPE-seedS-sN.pt2 -o WORK/...quantnpu-BITS.pte --bits BITS --calib-windows C \\
        --tokenizer WORK/SHAPE-seedS --eval --eval-windows E

(the shipped recipe, as `make run`: stage one, smoothing, GPTQ, the leading-token split, 10% promotion).
A row stores: the shape and its parameter count, the exact commands, the seconds and peak resident MiB of
the folder's writing and of the export (each child's own peak, from the kernel's accounting of the child:
`wait4`'s ru_maxrss), and of every stage of the lowering run and every pass (from its run record: the
process's own per-stage accounting, quantnpu.memory; the kernel's wait4 figure for that process is kept as
`wait4_maxrss_mib` but covers only the stretch since its last per-stage reset), the whole run's seconds
(export + lowering) and peak, which stage (and pass) set it, and how many MLPs the leading-token split
copied (decided from the activations: random weights have no attention sink). The markdown has one
table (rows = shapes, columns = stages), a least-squares line of each stage's peak and seconds against
the parameter count over the random-weight shapes (base + bytes per parameter), the passes' table, and
the targets of the memory work.

    python bench/scale.py [--rows SHAPE ...] [--out PATH] [--work DIR] [--dry-run] [--missing] [--write-only]
                          [--seq-len 128] [--eval-windows 1] [--calib-windows 16] [--bits 8-8-8] [--seed 0]

`--work DIR` (default build/scale) holds the folders, `.pt2`, `.pte` and run records (float32: SmolLM2-1.7B
takes 6.8 GB of folder and as much of `.pt2`; all default rows ~35 GB); it is not part of the setting (the
row's commands name their paths). `--dry-run` writes the folders that are missing and
prints each row's commands; it measures and records nothing. Results: bench/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
from harness import Bench, Context, RowConfig, Setting  # noqa: E402

# `smollm2-135m-real`: SmolLM2-135M-Instruct's trained weights (tools/export.py --model smollm2), beside its
# random-weight shape: the check that the random weights cost what trained ones do
REAL_ROWS = {"smollm2-135m-real": "smollm2-135m"}
DEFAULT_ROWS = ["smollm2-135m-real", "smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "llama-3.2-1b", "smollm2-1.7b"]
SETTING = Setting(seq_len=128, eval_windows=1, calib_windows=16, bits="8-8-8", seed=0)
WORK_ENV = "QUANTNPU_SCALE_WORK"  # how --work reaches the rows' processes
DEFAULT_WORK = ROOT / "build" / "scale"
# the stages of a row, in order: the folder's writing (not part of a user's run), the export, then the
# lowering run's own stages (its record's `seconds`; others it reports are kept too)
RUN_STAGES = ("export", "load", "eval float", "passes", "lower", "eval fake-quant", "eval .pte")
# issue point 4's targets
TARGET_SLOPE_BYTES = 4.0
TARGET_SHAPE, TARGET_PEAK_GIB, TARGET_HOURS = "smollm2-1.7b", 20.0, 4.0


def work_dir() -> Path:
    return Path(os.environ.get(WORK_ENV) or DEFAULT_WORK)


def row_paths(row: str, setting: Setting, work: Path) -> dict[str, Path | None]:
    stem = row if row in REAL_ROWS else f"{row}-seed{setting.seed}"
    pt2 = work / f"{stem}-s{setting.seq_len}.pt2"
    return {"folder": None if row in REAL_ROWS else work / stem, "pt2": pt2,
            "pte": pt2.with_name(f"{pt2.stem}.quantnpu-{setting.bits}.pte")}


def row_commands(row: str, setting: Setting, work: Path) -> dict[str, list[str]]:
    """The commands of a row, as a user types them (the interpreter and paths absolute); a real model's
    row has no `write`."""
    p = row_paths(row, setting, work)
    python = sys.executable
    lower = [python, str(ROOT / "tools" / "lower.py"), str(p["pt2"]), "-o", str(p["pte"]), "--bits", setting.bits,
             "--calib-windows", str(setting.calib_windows)]
    if row in REAL_ROWS:
        source = ["--model", "smollm2"]
    else:
        source = ["--hf", str(p["folder"])]
        lower += ["--tokenizer", str(p["folder"])]
    commands = {"export": [python, str(ROOT / "tools" / "export.py"), *source, "--seq-len", str(setting.seq_len),
                           "-o", str(p["pt2"]), "--force"],
                "lower": [*lower, "--eval", "--eval-windows", str(setting.eval_windows)]}
    if row not in REAL_ROWS:
        commands = {"write": [python, "-m", "quantnpu.models.shapes", "write", row, str(p["folder"]), "--seed", str(setting.seed)],
                    **commands}
    return commands


def config(row: str, setting: Setting) -> RowConfig:
    from quantnpu.models.shapes import SHAPES

    if row not in SHAPES and row not in REAL_ROWS:
        raise ValueError(f"row {row!r}: one of the shapes {', '.join(SHAPES)}, or {', '.join(REAL_ROWS)}")
    from quantnpu.pipeline import SHIPPED

    return RowConfig(setting.bits, (), SHIPPED.replace(bits=setting.bits))


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run `command` in the repository root (its output passes through); (seconds, the child's own peak
    resident MiB, from wait4). A failure raises, naming the command and its exit status."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT)
    try:
        _, status, usage = os.wait4(child.pid, 0)
    except BaseException:
        child.kill()
        raise
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"exit status {child.returncode}: {shlex.join(command)}")
    return round(seconds, 3), round(usage.ru_maxrss / 1024, 1)  # Linux: KiB


def peak_owner(stages: dict[str, dict], passes: list[dict], lower_peak: float) -> tuple[str, str | None]:
    """The stage of the user's run (export or a lowering stage) whose peak is the run's, and within
    `passes` the pass that set it."""
    run = {name: s for name, s in stages.items() if name != "write" and s.get("peak_mib") is not None}
    if not run:
        return "unknown", None
    stage = max(run, key=lambda name: run[name]["peak_mib"])
    if stage != "export" and lower_peak > run[stage]["peak_mib"] * 1.01 + 1:
        return "lower (outside its stages)", None
    if stage == "passes" and passes:
        return stage, max(passes, key=lambda p: p.get("peak_mib") or 0)["name"]
    return stage, None


def measure(row: str, config: RowConfig, context: Context, part=None, skip=()) -> dict:
    from quantnpu.models.shapes import folder_is_complete, shape

    setting = context.setting
    s = shape(REAL_ROWS.get(row, row))
    work = work_dir()
    work.mkdir(parents=True, exist_ok=True)
    paths, commands = row_paths(row, setting, work), row_commands(row, setting, work)
    stages: dict[str, dict] = {}
    if row in REAL_ROWS:
        pass  # trained weights: nothing to write
    elif folder_is_complete(paths["folder"], row, setting.seed):
        stages["write"] = {"reused": True}
    else:
        seconds, peak = run_measured(commands["write"])
        stages["write"] = {"seconds": seconds, "peak_mib": peak}
    seconds, peak = run_measured(commands["export"])
    stages["export"] = {"seconds": seconds, "peak_mib": peak}
    record_path = paths["pte"].with_suffix(".json")
    record_path.unlink(missing_ok=True)  # the record read below is this run's
    lower_seconds, lower_maxrss = run_measured(commands["lower"])
    record = json.loads(record_path.read_text())
    for name, stage_seconds in record["seconds"].items():
        stages[name] = {"seconds": stage_seconds, "peak_mib": record["stage_peak_memory_mib"].get(name)}
    passes = [{"name": p["name"], "seconds": p["seconds"], "peak_mib": p.get("peak_memory_mib")} for p in record["passes"]]
    lower_peak = record["peak_memory_mib"]
    run_peak = max(stages["export"]["peak_mib"], lower_peak)
    stage, pass_name = peak_owner(stages, passes, lower_peak)
    evaluation = record.get("evaluation", {})
    split = record.get("leading_split") or {}
    return {
        "shape": s.as_dict(), "weights": "trained" if row in REAL_ROWS else f"random (seed {setting.seed})",
        "parameters": s.parameter_count(),
        "commands": {k: shlex.join(v) for k, v in commands.items() if k != "write" or "reused" not in stages["write"]},
        "stages": stages, "passes": passes,
        "lower": {"seconds": lower_seconds, "peak_mib": lower_peak, "outside_stages_seconds":
                  round(lower_seconds - sum(record["seconds"].values()), 3), "wait4_maxrss_mib": lower_maxrss},
        "run_seconds": round(stages["export"]["seconds"] + lower_seconds, 3),
        "peak_rss_mib": run_peak, "peak_stage": stage, "peak_pass": pass_name,
        "calibration_windows": record["calibration"]["windows"], "eval_windows": evaluation.get("windows"),
        "ppl": {k: v.get("ppl") for k, v in evaluation.items() if isinstance(v, dict)},
        "record": str(record_path), "pte_bytes": record.get("pte_bytes"),
        # what the weights decide, and with it the graph's size: the MLPs given a copy for the leading tokens
        "split_mlps": sum(1 for layer in split.get("layers", []) if layer.get("split")),
    }


# ---------------------------------------------------------------------------------------------------
# The markdown


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares line y = base + slope * x over `points`; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f} GiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _cell(stage: dict | None) -> str:
    if not stage:
        return "-"
    if stage.get("reused"):
        return "reused"
    return f"{_duration(stage.get('seconds'))}, {_gib(stage.get('peak_mib'))}"


def stage_names(rows: list[dict]) -> list[str]:
    names = ["write", *RUN_STAGES]
    for r in rows:
        names += [n for n in r.get("stages", {}) if n not in names]
    return names


def body(results: dict) -> list[str]:
    from quantnpu.models.shapes import SHAPES

    rows = sorted(results["rows"], key=lambda r: r.get("parameters", 0))
    names = stage_names(rows)
    lines = [
        "Each cell: seconds, peak resident memory of that stage. `write` makes the shape's folder (seeded random "
        "weights; not part of a user's run, `reused` when the folder was there); `export` is tools/export.py's own "
        "process (its peak from the kernel's accounting of the child); the rest are tools/lower.py's stages, from "
        "its run record (the process's own per-stage accounting). Whole run = export + lowering (its process's wall "
        "time, set-up between stages included); its peak is the larger of the two processes'. `split MLPs`: the MLPs "
        "the leading-token split copied (`auto` decides from the activations: trained weights have an attention sink, "
        "random ones none, so a random-weight graph may be smaller than the trained model's; compare `smollm2-135m` "
        "with `smollm2-135m-real`).", "",
        "| shape | parameters | " + " | ".join(names) + " | whole run | peak | set by | split MLPs |",
        "|---|---:|" + "---|" * len(names) + "---:|---:|---|---:|",
    ]
    for r in rows:
        cells = [_cell(r.get("stages", {}).get(n)) for n in names]
        owner = r.get("peak_stage", "?") + (f" ({r['peak_pass']})" if r.get("peak_pass") else "")
        lines.append(f"| `{r['row']}` | {r.get('parameters', 0) / 1e6:.1f}M | " + " | ".join(cells)
                     + f" | {_duration(r.get('run_seconds'))} | {_gib(r.get('peak_rss_mib'))} | {owner} | {r.get('split_mlps', '-')} |")
    changed = [r["row"] for r in rows if REAL_ROWS.get(r["row"], r["row"]) in SHAPES and r.get("shape") is not None
               and r["shape"] != json.loads(json.dumps(SHAPES[REAL_ROWS.get(r["row"], r["row"])].as_dict()))]
    if changed:
        lines += ["", "Measured with another configuration than quantnpu/models/shapes.py holds now (rerun to replace): "
                  + ", ".join(f"`{c}`" for c in changed) + "."]
    lines += ["", "## Growth with the parameter count", "", "Over the random-weight shapes (a trained model's row is not in the lines).", ""]
    real = [r for r in rows if r["row"] in REAL_ROWS]
    rows = [r for r in rows if r["row"] not in REAL_ROWS]
    points = [(r["parameters"], r["peak_rss_mib"] * 2**20) for r in rows if r.get("peak_rss_mib") is not None]
    line = fit(points)
    if line is None:
        lines.append("A line needs rows of two parameter counts at least.")
    else:
        base, slope = line
        lines += [f"Whole run's peak over the {len(points)} shapes (least squares): **{base / 2**30:.2f} GiB + "
                  f"{slope:.2f} bytes/parameter** (target: under {TARGET_SLOPE_BYTES:g} bytes/parameter above a fixed base: "
                  f"{'met' if slope < TARGET_SLOPE_BYTES else 'not met'}).", ""]
        lines += ["Per stage (each stage's peak and seconds against the parameter count, least squares over the shapes):", "",
                  "| stage | peak base | peak bytes/parameter | seconds base | seconds per 100M parameters |",
                  "|---|---:|---:|---:|---:|"]
        for name in names:
            measured = [(r["parameters"], r["stages"][name]) for r in rows if isinstance(r.get("stages", {}).get(name), dict)
                        and r["stages"][name].get("seconds") is not None]
            peak_line = fit([(p, s["peak_mib"] * 2**20) for p, s in measured if s.get("peak_mib") is not None])
            time_line = fit([(p, s["seconds"]) for p, s in measured])
            if peak_line is None and time_line is None:
                continue
            lines.append(f"| {name} | " + (f"{peak_line[0] / 2**30:.2f} GiB | {peak_line[1]:.2f} |" if peak_line else "- | - |")
                         + (f" {time_line[0]:.1f} s | {time_line[1] * 1e8:.1f} s |" if time_line else " - | - |"))
        seconds_line = fit([(r["parameters"], r["run_seconds"]) for r in rows if r.get("run_seconds") is not None])
        if seconds_line is not None:
            lines.append(f"| whole run | {base / 2**30:.2f} GiB | {slope:.2f} | {seconds_line[0]:.1f} s | {seconds_line[1] * 1e8:.1f} s |")
    target = next((r for r in rows if r["row"] == TARGET_SHAPE), None)
    if target is not None:
        peak_gib, hours = target["peak_rss_mib"] / 1024, target["run_seconds"] / 3600
        lines += ["", f"`{TARGET_SHAPE}`: peak {peak_gib:.2f} GiB (target <= {TARGET_PEAK_GIB:g} GiB: "
                  f"{'met' if peak_gib <= TARGET_PEAK_GIB else 'not met'}), whole run {hours:.2f} h (target <= {TARGET_HOURS:g} h: "
                  f"{'met' if hours <= TARGET_HOURS else 'not met'})."]
    rows = sorted([*real, *rows], key=lambda r: r.get("parameters", 0))
    lines += ["", "## Passes", "", "Each cell: seconds, peak resident memory of the pass (tools/lower.py's run record).", "",
              "| pass | " + " | ".join(f"`{r['row']}`" for r in rows) + " |", "|---|" + "---|" * len(rows)]
    pass_names: list[str] = []
    for r in rows:
        pass_names += [p["name"] for p in r.get("passes", []) if p["name"] not in pass_names]
    for name in pass_names:
        cells = []
        for r in rows:
            found = next((p for p in r.get("passes", []) if p["name"] == name), None)
            cells.append(_cell(found))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Commands of each row (tools/lower.py's record beside its `.pte`):", ""]
    for r in rows:
        lines.append(f"- `{r['row']}`:")
        lines += [f"  - `{c}`" for c in r.get("commands", {}).values()]
    return lines


BENCH = Bench(
    name="scale", script=__file__, title="Scale: peak memory and seconds per stage, by model size",
    setting=SETTING, default_rows=DEFAULT_ROWS, config=config, measure=measure, body=body,
    description="Peak resident memory and seconds of every stage for decoders of the real sizes (seeded random "
                "weights). Also: --work DIR (default build/scale) for the folders and outputs, --dry-run to write "
                "the folders and print the commands only.",
    rows_help="shapes to measure (default: " + " ".join(DEFAULT_ROWS) + "; also tiny)",
)


def dry_run(rows: list[str], setting: Setting) -> int:
    from quantnpu.models.shapes import folder_is_complete, write_folder

    work = work_dir()
    for row in rows:
        folder = row_paths(row, setting, work)["folder"]
        if folder is not None and not folder_is_complete(folder, row, setting.seed):
            write_folder(row, folder, setting.seed)
            print(f"# wrote {folder}")
        commands = row_commands(row, setting, work)
        print(f"# {row}")
        for name in ("export", "lower"):  # `write` is done
            print(shlex.join(commands[name]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--work")
    own.add_argument("--dry-run", action="store_true")
    known, rest = own.parse_known_args(argv)
    if known.work:
        os.environ[WORK_ENV] = str(Path(known.work).resolve())
    if known.dry_run:
        args = harness.parser_for(BENCH).parse_args(rest)
        setting = harness.setting_from_args(args, BENCH.setting)
        rows = BENCH.default_rows if args.rows is None else args.rows
        for row in rows:
            config(row, setting)
        return dry_run(rows, setting)
    return harness.main(BENCH, rest)


if __name__ == "__main__":
    sys.exit(main())
