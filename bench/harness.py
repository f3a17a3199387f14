"""One harness for the benchmarks in bench/: the set-up they share, one row per child process, one
merge rule, and rows that say what they measured and on which commit.

A benchmark is a `Bench`: its rows by name (`config(row, setting)` turns a name into the pipeline
arguments, a `RowConfig` built from the recipes of `quantnpu.pipeline`), how one row is measured
(`measure(row, config, context)`, in a child process), and the markdown of its tables (`body`).
`main(bench)` is its command line:

    python bench/<script>.py [--rows ROW ...] [--missing] [--out PATH] [setting flags] [--write-only]

- **Setting.** Everything the rows of a results file are measured under (sequence length, evaluation
  and calibration windows, stage-one steps, ...): a `Setting`, whose fields become flags. A results
  file holds one setting; a run with another setting is refused with a one-line error naming both and
  the `--out` to use instead. Nothing is compared in part.
- **Rows.** Each row runs in its own process (`--one ROW`; memory is returned between rows) and comes
  back as a record: the row's measurements, its `config` (the plan, its overrides and the recipe's
  `as_dict()`), its `setting`, the `commit` (`git rev-parse HEAD`) and `dirty` (uncommitted changes
  under quantnpu/ or bench/ when it ran). A row another bench already measured with the same config
  and setting (`reuse`) is taken from there, marked `same_as`.
- **One merge rule.** A measured row replaces that row's earlier measurement and keeps every other
  row. A part of a row measured on its own (fidelity's agreement check, `--only PART`) replaces that
  part, which carries its own commit.
- **The markdown** lists the commands that made the rows, the bench's tables, the rows still missing
  (the bench's default rows and every row a recorded command named), and the commit of every row.

Nothing here imports torch until a row is measured: the merge rule and the writer are tested
without a model (tests/test_bench_harness.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FORMAT = "quantnpu-bench/1"
UNKNOWN_COMMIT = "unknown (before the harness)"
# what a row's `dirty` flag looks at: the code that computes a row
WATCHED = ("quantnpu", "bench")
RESULT_DIRS = ("bench/results", "bench/studies/results")


class HarnessError(Exception):
    """A results file the harness will not write into (another setting, another bench, another format)."""


# ---------------------------------------------------------------------------------------------------
# Setting


class Setting:
    """What every row of one results file is measured under: named values (int, float, str, or a
    tuple of ints), compared in full. `Setting(seq_len=512, eval_windows=16, ...)`; a bench's default
    setting also declares its flags (`--seq-len`, `--eval-windows`, ...)."""

    def __init__(self, **values: Any) -> None:
        self._values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"the setting has no {name!r} (it has {', '.join(self.__dict__['_values'])})") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Setting) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.as_dict(), sort_keys=True))

    def __repr__(self) -> str:
        return f"Setting({self.describe()})"

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def replace(self, **changes: Any) -> Setting:
        return Setting(**{**self._values, **changes})

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._values.items()}

    @classmethod
    def from_dict(cls, values: dict) -> Setting:
        return cls(**values)

    def describe(self) -> str:
        return ", ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in self.as_dict().items())

    def differences(self, other: Setting) -> list[str]:
        mine, theirs = self.as_dict(), other.as_dict()
        return [k for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]

    def covers(self, other: dict) -> bool:
        """Every value of this setting is `other`'s too (`other` may record more, e.g. last-word
        passages a bench that reuses its rows does not measure)."""
        return all(other.get(k) == v for k, v in self.as_dict().items())


def add_setting_flags(parser: argparse.ArgumentParser, defaults: Setting) -> None:
    for name, value in defaults.as_dict().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, type=int, nargs="*", default=value, help=f"(setting; default {' '.join(map(str, value))})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"(setting; default {value})")


def setting_from_args(args: argparse.Namespace, defaults: Setting) -> Setting:
    return Setting(**{name: getattr(args, name) for name in defaults.as_dict()})


# ---------------------------------------------------------------------------------------------------
# A row's configuration: the pipeline's arguments


@dataclass(frozen=True)
class RowConfig:
    """The arguments a row hands `quantnpu.pipeline.pipeline`: `plan` (a `W-A-KV` bit plan, an
    `et-<config>` of ExecuTorch's QnnQuantizer, None for the float passes alone, or "eager" for the
    model before export), the plan's `overrides` and the `recipe` (None with plan None: the exported
    graph as is, no pass)."""

    plan: str | None
    overrides: tuple[str, ...] = ()
    recipe: Any = None  # quantnpu.pipeline.Recipe

    def as_dict(self) -> dict:
        return {"plan": self.plan, "overrides": list(self.overrides),
                "recipe": None if self.recipe is None else json.loads(json.dumps(self.recipe.as_dict(), default=str))}

    def replace(self, **changes: Any) -> RowConfig:
        return dataclasses.replace(self, **changes)

    def passes(self, calibration: Sequence = (), progress: bool = True, soc: str = "SM8650") -> list:
        """The pipeline of this row, from `quantnpu.pipeline.pipeline` (the only place passes are assembled)."""
        from quantnpu.pipeline import STATIC, pipeline
        from quantnpu.quantizers.bit_plan import BitPlan

        if self.plan == "eager":
            raise HarnessError("the eager model has no pipeline")
        plan = self.plan
        if plan is not None and not plan.startswith("et-"):
            plan = BitPlan.parse(plan, self.overrides)
        return pipeline(plan, calibration, self.recipe if self.recipe is not None else STATIC, soc=soc, progress=progress)


def config_key(config: dict | None) -> dict | None:
    """What decides whether two rows ran the same pipeline: the config without the recipe's name
    (`custom` or not depends on how it was written) and its CLI default bits (the plan is given)."""
    if config is None:
        return None
    recipe = config.get("recipe")
    if recipe is not None:
        recipe = {k: v for k, v in recipe.items() if k not in ("name", "bits")}
    return {**config, "recipe": recipe}


def rotation_lr(bits: str) -> float:
    """Stage one's rotation lr in the benches: the paper's 0.1 at 8-bit weights, 2.0 with 4-bit
    weights (bench/results/stage_one.md's rows use it; StageOneConfig's default is 0.1)."""
    return 0.1 if bits.startswith("8") else 2.0


# ---------------------------------------------------------------------------------------------------
# Commit


def git_state(root: Path = ROOT) -> dict:
    """`commit`: HEAD; `dirty`: whether quantnpu/ or bench/ (results aside) has uncommitted changes
    (then `dirty_paths` names them): a dirty row was measured on code no commit holds."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
        return done.stdout if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD").strip() or "unknown (not a git checkout)"
    # results files are what rows write, not code that computes them
    changed = [line[3:] for line in git("status", "--porcelain", "--", *WATCHED, *(f":(exclude){r}" for r in RESULT_DIRS)).splitlines()
               if line.strip()]
    state: dict = {"commit": commit, "dirty": bool(changed)}
    if changed:
        state["dirty_paths"] = changed[:20] + ([f"... {len(changed) - 20} more"] if len(changed) > 20 else [])
    return state


def short_commit(row: dict) -> str:
    commit = row.get("commit") or UNKNOWN_COMMIT
    text = commit[:10] if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit) else commit
    return text + (" (dirty)" if row.get("dirty") else "")


# ---------------------------------------------------------------------------------------------------
# The shared set-up


class Context:
    """What a row is measured on, built on first use: QNN SDK activated, SmolLM2 and its tokenizer,
    Brown's evaluation and calibration windows at the setting, the exported graph; at
    `pte_seq_len` (if the setting has one) the same for the rows run on the HTP simulator (their
    calibration: `pte_calib_windows` windows if the setting names it, else as many tokens as the
    setting's, `calib_windows * seq_len / pte_seq_len` windows)."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.soc = setting.get("soc", "SM8650")  # the pipeline's and the lowering's target

    @cached_property
    def sdk(self):
        from quantnpu.lowering import qnn_sdk

        return qnn_sdk.activate()  # the layout already active, else the prepared one

    @cached_property
    def _model(self):
        from quantnpu.models.smollm2 import load_smollm2

        self.sdk  # torch first, then the QNN libraries
        return load_smollm2()

    @property
    def model(self):
        return self._model[0]

    @property
    def tokenizer(self):
        return self._model[1]

    def windows_at(self, split: str, seq_len: int, count: int):
        from quantnpu.models.corpus import split_tokens, token_windows

        return token_windows(split_tokens(self.tokenizer, split), seq_len, count)

    def calibration_at(self, seq_len: int, count: int) -> list:
        return list(self.windows_at("calibration", seq_len, count).unsqueeze(1))

    def export_at(self, seq_len: int):
        from quantnpu.models.export import export_causal_lm

        return export_causal_lm(self.model, seq_len)

    @cached_property
    def windows(self):
        return self.windows_at("evaluation", self.setting.seq_len, self.setting.eval_windows)

    @cached_property
    def calibration(self) -> list:
        return self.calibration_at(self.setting.seq_len, self.setting.calib_windows)

    @cached_property
    def program(self):
        """The exported program at the setting's length (`.module()` is a fresh GraphModule each time)."""
        return self.export_at(self.setting.seq_len)

    @cached_property
    def graph(self):
        return self.program.module()

    @cached_property
    def pte_windows(self):
        return self.windows_at("evaluation", self.setting.pte_seq_len, self.setting.pte_windows)

    @cached_property
    def pte_calibration(self) -> list:
        s = self.setting
        return self.calibration_at(s.pte_seq_len, s.get("pte_calib_windows") or s.calib_windows * s.seq_len // s.pte_seq_len)

    @cached_property
    def pte_graph(self):
        return self.export_at(self.setting.pte_seq_len).module()

    def float_graph(self, graph=None, rotate: str = "hadamard"):
        """The float passes (verified) with `rotate` on a copy of `graph` (default: the exported one)."""
        import copy

        from quantnpu.pipeline import STATIC

        return run_passes(RowConfig(None, recipe=STATIC.replace(rotate=rotate)).passes(progress=False),
                          copy.deepcopy(self.graph if graph is None else graph))

    def fake_quant(self, config: RowConfig, graph=None, calibration=None):
        """The row's pipeline on a copy of `graph` up to its fake-quant graph (the last calibration or
        rounding pass; an `et-*` plan's whole pipeline): (fake-quant graph, passes, seconds)."""
        import copy

        from quantnpu.passes import PassManager
        from quantnpu.pipeline import fake_quant_end

        calibration = self.calibration if calibration is None else calibration
        passes = config.passes(calibration, soc=self.soc)
        stop = None if config.plan is None or config.plan.startswith("et-") else fake_quant_end(passes)
        start = time.perf_counter()
        fq = PassManager(passes, stop_after=stop, progress=True).run(copy.deepcopy(self.graph if graph is None else graph))
        return fq, passes, time.perf_counter() - start

    def converted(self, fq, config: RowConfig, calibration=None):
        """The rest of the row's pipeline after its fake-quant graph: the integer-only Q/DQ graph."""
        import copy

        from quantnpu.passes import PassManager
        from quantnpu.pipeline import fake_quant_end

        passes = config.passes(self.calibration if calibration is None else calibration, progress=False, soc=self.soc)
        return PassManager(passes).run(copy.deepcopy(fq), start_after=fake_quant_end(passes))


def pte_measurement(fq, quantized, windows, label: str) -> dict:
    """Lower the Q/DQ graph (to a temporary `.pte`, deleted afterwards: the numbers are what is kept)
    and run the fake-quant graph, the Q/DQ graph (what lowering consumes) and the `.pte` on the HTP
    simulator over `windows`: their ppl and the lowering facts."""
    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.runtime_harness.pte import PteModel

    with tempfile.TemporaryDirectory() as work:
        lowered = lower_to_qnn(quantized, (windows[:1],), Path(work) / "row.pte")
        fq_ppl = perplexity(fq, windows, f"fake-quant {label}")
        qdq_ppl = perplexity(quantized, windows, f"Q/DQ graph {label}")
        pte_ppl = perplexity(PteModel(lowered.pte_path), windows, f".pte {label}")
    return {"fake_quant": fq_ppl, "qdq": qdq_ppl, "pte": pte_ppl, "relative_gap": abs(pte_ppl - fq_ppl) / fq_ppl,
            "delegates": lowered.delegates, "outside_delegates": lowered.outside_delegates,
            "mib": lowered.size_bytes / 2**20, "lower_seconds": round(lowered.seconds, 1)}


# The setting of bench/static.py's `.pte` rows (4 x 128 evaluation tokens, 32 x 128 calibration), which the
# studies in bench/studies/ share so that their numbers sit beside those `.pte` ppl.
STATIC_PTE_SETTING = Setting(seq_len=128, eval_windows=4, calib_windows=32)


def static_config(bits: str, overrides: Sequence[str] = ()) -> RowConfig:
    """The STATIC recipe (R1/R2, Max-Min static encodings) at `bits`."""
    from quantnpu.pipeline import STATIC

    return RowConfig(bits, tuple(overrides), STATIC)


def run_passes(passes: list, graph):
    from quantnpu.passes import PassManager

    return PassManager(passes).run(graph)


def perplexity(forward, windows, label: str, **options) -> float:
    from quantnpu.runtime_harness.perplexity import perplexity as measure

    return measure(forward, windows, label, **options).ppl


# ---------------------------------------------------------------------------------------------------
# A bench


@dataclass
class Bench:
    """One benchmark: `name` (its results are bench/results/<name>.{json,md}), `script` (the file the
    child process runs), `title` (the markdown's), `setting` (defaults; each value is a flag),
    `default_rows`, `config(row, setting) -> RowConfig` (ValueError for a row it does not know),
    `measure(row, config, context, part) -> dict` (the row's measurements; `part`: None for the whole
    row, or one of `parts` alone), `body(results) -> markdown lines` (the bench's tables, from the
    results dict), `reuse` (names of other benches whose rows with the same config and setting are
    taken rather than measured), `parts` (parts of a row that can be measured on their own, each
    stored under its name with its own commit), `derived(results) -> dict` (file-level facts computed
    when writing, stored in the JSON), `after_write(results, out)` (e.g. a figure)."""

    name: str
    script: str
    title: str
    setting: Setting
    default_rows: list[str]
    config: Callable[[str, Setting], RowConfig]
    measure: Callable[..., dict]
    body: Callable[[dict], list[str]]
    reuse: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    derived: Callable[[dict], dict] | None = None
    after_write: Callable[[dict, Path], None] | None = None
    description: str = ""
    rows_help: str = ""

    def stale(self, results: dict) -> list[str]:
        """Rows whose stored config is not what their name builds now (the recipe changed since):
        they were measured, but not with today's pipeline."""
        setting = Setting.from_dict(results["setting"])
        stale = []
        for r in results["rows"]:
            if r.get("same_as") or "config" not in r:
                continue
            try:
                now = self.config(r["row"], setting).as_dict()
            except ValueError:
                stale.append(r["row"])
                continue
            if config_key(now) != config_key(r["config"]):
                stale.append(r["row"])
        return stale


# ---------------------------------------------------------------------------------------------------
# Results files: one merge rule


class Results:
    """A results file in the harness's format: {format, bench, setting, commands, rows, ...}."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data

    @classmethod
    def new(cls, path: Path, bench: str, setting: Setting) -> Results:
        return cls(path, {"format": FORMAT, "bench": bench, "setting": setting.as_dict(), "commands": [], "rows": []})

    @classmethod
    def open(cls, out: Path, bench: Bench | str, setting: Setting, suggest: str | None = None) -> Results:
        """The results file at `out` (.json), or a new one. Refused (HarnessError, one line): a file of
        another bench, not in this format, or measured under another setting (the error names both
        settings and an --out for the new one)."""
        name = bench if isinstance(bench, str) else bench.name
        path = Path(out).with_suffix(".json")
        if not path.is_file():
            return cls.new(path, name, setting)
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise HarnessError(f"{display(path)} is not a results file of the bench harness ({FORMAT}): pass another --out")
        if data.get("bench") != name:
            raise HarnessError(f"{display(path)} holds rows of bench/{data.get('bench')}, not of bench/{name}: pass another --out")
        old = Setting.from_dict(data["setting"])
        if old != setting:
            other = suggest or suggested_out(Path(out), setting, old)
            raise HarnessError(f"{display(path)} was measured under {{{old.describe()}}}, not {{{setting.describe()}}}: "
                               f"pass --out {other} to measure in this setting")
        return cls(path, data)

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    @property
    def setting(self) -> Setting:
        return Setting.from_dict(self.data["setting"])

    def row(self, name: str) -> dict | None:
        return next((r for r in self.rows if r["row"] == name), None)

    def add_command(self, command: str, rows: Iterable[str]) -> None:
        self.data["commands"].append({"command": command, "rows": list(rows)})

    def merge(self, record: dict, part: str | None = None) -> None:
        """THE merge rule: the row's earlier measurement (if any) is replaced, every other row kept;
        with `part`, only that part of the row is replaced (the row must exist)."""
        if Setting.from_dict(record.get("setting", self.data["setting"])) != self.setting and not record.get("same_as"):
            raise HarnessError(f"row {record['row']} was measured under {{{Setting.from_dict(record['setting']).describe()}}}, "
                               f"not this file's {{{self.setting.describe()}}}")
        for i, r in enumerate(self.rows):
            if r["row"] == record["row"]:
                if part is None:
                    self.rows[i] = record
                else:
                    self.rows[i] = {**r, part: record[part]}
                return
        if part is not None:
            raise HarnessError(f"{display(self.path)} has no row {record['row']} to add its {part} to: measure the row first")
        self.rows.append(record)

    def missing(self, default_rows: Sequence[str]) -> list[str]:
        """The bench's default rows and every row a recorded command named, not in this file."""
        named = [r for c in self.data["commands"] for r in c.get("rows", [])]
        have = {r["row"] for r in self.rows}
        return [r for r in dict.fromkeys([*default_rows, *named]) if r not in have]

    def write(self, bench: Bench) -> None:
        from quantnpu.fileio import atomic_write_text

        if bench.derived is not None:
            self.data.update(bench.derived(self.data))
        text = markdown(bench, self)
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")
        atomic_write_text(self.path.with_suffix(".md"), text)
        if bench.after_write is not None:
            bench.after_write(self.data, self.path.with_suffix(""))


def display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def suggested_out(out: Path, setting: Setting, old: Setting) -> str:
    slug = "-".join(f"{k.replace('_', '')}{'_'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in setting.as_dict().items() if k in setting.differences(old))
    return display(out.with_suffix("").parent / f"{out.with_suffix('').name}-{slug}")


def script_name(bench: Bench) -> str:
    """The bench's script as a command names it: relative to the repository root when inside it."""
    script = Path(bench.script).resolve()
    return str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else str(script)


def markdown(bench: Bench, results: Results) -> str:
    data = results.data
    lines = [f"# {bench.title}", "", f"Setting of every row: {results.setting.describe()}.", "",
             "Commands (each row in its own process; a row measured again replaces its earlier measurement, "
             "the other rows are kept):", "",
             *[f"    {c['command']}" + ("    # before the harness: the flags of that time" if c.get("before_harness") else "")
               for c in data["commands"]], ""]
    lines += bench.body(data)
    lines += ["", "## Rows", ""]
    missing = results.missing(bench.default_rows)
    script = script_name(bench)
    lines.append("Missing (the default rows of `python " + script + "` and the rows its commands named, not measured here): "
                 + (", ".join(f"`{r}`" for r in missing) if missing else "none") + ".")
    stale = bench.stale(data)
    if stale:
        lines += ["", "Measured with another configuration than the row's name builds now (the recipe changed since; "
                  "rerun to replace): " + ", ".join(f"`{r}`" for r in stale) + "."]
    lines += ["", "Commit of each row's measurement (dirty: uncommitted changes under quantnpu/ or bench/ when it ran):", ""]
    by_commit: dict[str, list[str]] = {}
    for r in data["rows"]:
        label = short_commit(r)
        by_commit.setdefault(label, []).append(f"`{r['row']}`" + (f" (as {r['same_as']})" if r.get("same_as") else ""))
        for part in bench.parts:
            if isinstance(r.get(part), dict) and (r[part].get("commit"), r[part].get("dirty")) != (r.get("commit"), r.get("dirty")):
                by_commit.setdefault(short_commit(r[part]), []).append(f"`{r['row']}` {part}")
    lines += [f"- {commit}: {', '.join(rows)}" for commit, rows in by_commit.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Running rows


def measured_elsewhere(bench: Bench, row: str, setting: Setting) -> dict | None:
    """The row as another bench (`bench.reuse`) measured it: same config (`config_key`), and that
    bench's setting holds every value of this one. Marked `same_as`; keeps its own commit."""
    wanted = config_key(bench.config(row, setting).as_dict())
    for name in bench.reuse:
        path = RESULTS / f"{name}.json"
        other = json.loads(path.read_text()) if path.is_file() else {}
        if other.get("format") != FORMAT or not setting.covers(other.get("setting", {})):
            continue
        for measured in other.get("rows", []):
            if measured.get("config") is not None and not measured.get("same_as") and config_key(measured["config"]) == wanted:
                return {**measured, "row": row, "same_as": f"{name} {measured['row']}"}
    return None


def child_command(bench: Bench, row: str, setting: Setting, result: Path, part: str | None, skip: Sequence[str]) -> list[str]:
    command = [sys.executable, bench.script, "--one", row, "--result", str(result), "--setting-json", json.dumps(setting.as_dict())]
    if part:
        command += ["--only", part]
    for s in skip:
        command += ["--skip", s]
    return command


def measure_in_child(bench: Bench, row: str, setting: Setting, part: str | None = None, skip: Sequence[str] = ()) -> dict | None:
    """`script --one ROW` in its own process; its record, or None if it failed."""
    with tempfile.TemporaryDirectory() as work:
        result = Path(work) / "row.json"
        child = subprocess.run(child_command(bench, row, setting, result, part, skip))
        if child.returncode != 0 or not result.is_file():
            print(f"{row}: failed (exit {child.returncode})", file=sys.stderr)
            return None
        return json.loads(result.read_text())


def record(row: str, config: RowConfig, setting: Setting, measured: dict, state: dict, part: str | None = None) -> dict:
    """A row as stored: its measurements, config, setting and commit (a part measured alone: the
    part's measurements, with the commit, config and setting inside it)."""
    facts = {"config": config.as_dict(), "setting": setting.as_dict(), **state}
    if part is not None:
        return {"row": row, "setting": setting.as_dict(), part: {**measured[part], **facts}}
    return {"row": row, **measured, **facts}


def child_main(bench: Bench, row: str, setting: Setting, result: Path, part: str | None, skip: Sequence[str]) -> int:
    from quantnpu.fileio import atomic_write_text
    from quantnpu.runtime_harness.records import package_versions, peak_memory_mib

    state = git_state()  # before anything runs: the code this row is measured with
    config = bench.config(row, setting)
    start = time.perf_counter()
    measured = bench.measure(row, config, Context(setting), part=part, skip=tuple(skip))
    if part is None:
        measured.setdefault("total_seconds", round(time.perf_counter() - start, 1))
        measured.setdefault("peak_rss_mib", peak_memory_mib())
        measured.setdefault("versions", package_versions())
    atomic_write_text(result, json.dumps(record(row, config, setting, measured, state, part), indent=1) + "\n")
    return 0


def run_rows(bench: Bench, rows: Sequence[str], setting: Setting, out: Path, command: str, part: str | None = None,
             skip: Sequence[str] = (), measure=measure_in_child) -> int:
    """Each row in its own process, merged into the results file as it finishes (the file is written
    after every row). Exit status 1 if a row failed (the rows before it are kept)."""
    results = Results.open(out, bench, setting)
    if part is not None:
        absent = [r for r in rows if results.row(r) is None]
        if absent:
            raise HarnessError(f"{display(results.path)} has no row {', '.join(absent)} to measure the {part} of: measure the row first")
    results.add_command(command, rows)
    results.write(bench)
    for row in rows:
        reused = measured_elsewhere(bench, row, setting) if part is None and bench.reuse else None
        measured = reused if reused is not None else measure(bench, row, setting, part, skip)
        if measured is None:
            return 1
        # read again before merging: rows another run merged meanwhile are kept
        results = Results.open(out, bench, setting)
        results.merge(measured, part)
        results.write(bench)
        print(f"{row}: " + (f"taken from {reused['same_as']} (same config and setting)" if reused is not None
                            else f"measured, written to {display(results.path)}"), flush=True)
    return 0


def parser_for(bench: Bench) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=bench.description or bench.title)
    parser.add_argument("--rows", nargs="*", default=None, metavar="ROW",
                        help=bench.rows_help or "rows to measure (default: the bench's default rows)")
    parser.add_argument("--out", default=str(RESULTS / bench.name), help="results file, without suffix (default: %(default)s)")
    parser.add_argument("--missing", action="store_true", help="measure only the rows (of --rows, or the default rows) the results file lacks")
    parser.add_argument("--write-only", action="store_true", help="rewrite the markdown (and figures) from the JSON; measure nothing")
    if bench.parts:
        parser.add_argument("--only", choices=bench.parts, help="measure only this part of each row (the rows must be in the file)")
        parser.add_argument("--skip", choices=bench.parts, action="append", default=[], help="do not measure this part")
    add_setting_flags(parser, bench.setting)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--setting-json", help=argparse.SUPPRESS)
    return parser


def main(bench: Bench, argv: Sequence[str] | None = None) -> int:
    """The command line of a bench (see the module docstring)."""
    parser = parser_for(bench)
    args = parser.parse_args(argv)
    part, skip = getattr(args, "only", None), getattr(args, "skip", [])
    if args.one:
        return child_main(bench, args.one, Setting.from_dict(json.loads(args.setting_json)), Path(args.result), part, skip)
    out = Path(args.out)
    if args.write_only:
        results = Results(out.with_suffix(".json"), json.loads(out.with_suffix(".json").read_text()))
        results.write(bench)
        return 0
    setting = setting_from_args(args, bench.setting)
    rows = bench.default_rows if args.rows is None else args.rows
    if args.missing and out.with_suffix(".json").is_file():
        have = {r["row"] for r in json.loads(out.with_suffix(".json").read_text()).get("rows", [])}
        rows = [r for r in rows if r not in have]
    for row in rows:
        try:
            bench.config(row, setting)
        except ValueError as error:
            parser.error(str(error))
    argv = sys.argv[1:] if argv is None else list(argv)
    command = f"python {script_name(bench)} " + shlex.join(argv)
    try:
        return run_rows(bench, rows, setting, out, command.rstrip(), part, skip)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
