"""bench/harness.py without a model: the merge rule, the refusal of another setting, what a row
carries, the missing rows. A toy bench runs its rows in real child processes (seconds)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
from harness import HarnessError, Results, RowConfig, Setting  # noqa: E402

TOY = textwrap.dedent(f"""
    import os
    import sys

    sys.path.insert(0, {str(BENCH_DIR)!r})
    from harness import Bench, RowConfig, Setting, main


    def config(row, setting):
        if not row.startswith("r"):
            raise ValueError(f"row {{row!r}}: write rN")
        return RowConfig("8-8-8", ("*.down_proj.input=16",) if row.endswith("16") else ())


    def measure(row, config, context, part=None, skip=()):
        value = float(os.environ.get("TOY_VALUE", "1")) * context.setting.seq_len
        if part == "extra":
            return {{"extra": {{"value": value}}}}
        return {{"ppl": value, **({{}} if "extra" in skip else {{"extra": {{"value": value}}}})}}


    def body(results):
        return ["| row | ppl |", "|---|---|"] + [f"| {{r['row']}} | {{r['ppl']}} |" for r in results["rows"]]


    BENCH = Bench(name="toy", script=__file__, title="Toy", setting=Setting(seq_len=4, eval_windows=1),
                  default_rows=["r1", "r2", "r16"], config=config, measure=measure, body=body, parts=("extra",))

    if __name__ == "__main__":
        sys.exit(main(BENCH))
""")


def run_toy(tmp_path: Path, *args: str, value: str = "1") -> subprocess.CompletedProcess:
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    return subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "toy"), *args], capture_output=True, text=True,
                          env={**os.environ, "TOY_VALUE": value}, cwd=tmp_path, timeout=120)


def rows_of(tmp_path: Path) -> dict[str, dict]:
    return {r["row"]: r for r in json.loads((tmp_path / "toy.json").read_text())["rows"]}


def test_rows_run_in_child_processes_and_carry_config_setting_and_commit(tmp_path):
    done = run_toy(tmp_path, "--rows", "r1", "r16")
    assert done.returncode == 0, done.stderr
    rows = rows_of(tmp_path)
    assert list(rows) == ["r1", "r16"]
    r16 = rows["r16"]
    assert r16["ppl"] == 4.0
    assert r16["config"] == {"plan": "8-8-8", "overrides": ["*.down_proj.input=16"], "recipe": None}
    assert r16["setting"] == {"seq_len": 4, "eval_windows": 1}
    assert re.fullmatch(r"[0-9a-f]{40}", r16["commit"]) and isinstance(r16["dirty"], bool)
    assert "peak_rss_mib" in r16 and "versions" in r16
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["commands"] == [{"command": f"python {tmp_path / 'toy.py'} --out {tmp_path / 'toy'} --rows r1 r16", "rows": ["r1", "r16"]}]


def test_merge_replaces_the_rows_measurement_and_keeps_the_others(tmp_path):
    assert run_toy(tmp_path, "--rows", "r1", "r2").returncode == 0
    assert run_toy(tmp_path, "--rows", "r2", value="3").returncode == 0
    rows = rows_of(tmp_path)
    assert list(rows) == ["r1", "r2"]  # r2 replaced in place, r1 kept
    assert (rows["r1"]["ppl"], rows["r2"]["ppl"]) == (4.0, 12.0)
    assert len(json.loads((tmp_path / "toy.json").read_text())["commands"]) == 2


def test_a_part_is_merged_with_its_own_commit_and_needs_its_row(tmp_path):
    assert run_toy(tmp_path, "--rows", "r1", "--skip", "extra").returncode == 0
    assert "extra" not in rows_of(tmp_path)["r1"]
    assert run_toy(tmp_path, "--rows", "r1", "--only", "extra", value="2").returncode == 0
    r1 = rows_of(tmp_path)["r1"]
    assert r1["ppl"] == 4.0 and r1["extra"]["value"] == 8.0
    assert re.fullmatch(r"[0-9a-f]{40}", r1["extra"]["commit"]) and r1["extra"]["setting"] == r1["setting"]
    refused = run_toy(tmp_path, "--rows", "r2", "--only", "extra")
    assert refused.returncode == 2 and "no row r2" in refused.stderr


def test_a_results_file_from_another_setting_is_refused(tmp_path):
    assert run_toy(tmp_path, "--rows", "r1").returncode == 0
    before = (tmp_path / "toy.json").read_text()
    refused = run_toy(tmp_path, "--rows", "r1", "--seq-len", "8")
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "seq_len 4, eval_windows 1" in message and "seq_len 8, eval_windows 1" in message
    assert "--out " in message and "toy-seqlen8" in message
    assert (tmp_path / "toy.json").read_text() == before  # nothing written


def test_the_markdown_lists_missing_rows_and_commits(tmp_path):
    assert run_toy(tmp_path, "--rows", "r1", "r5").returncode == 0
    text = (tmp_path / "toy.md").read_text()
    assert "Setting of every row: seq_len 4, eval_windows 1." in text
    assert f"python {tmp_path / 'toy.py'} --out {tmp_path / 'toy'} --rows r1 r5" in text
    missing = next(line for line in text.splitlines() if line.startswith("Missing"))
    assert "`r2`" in missing and "`r16`" in missing and "`r1`" not in missing and "`r5`" not in missing
    assert re.search(r"^- [0-9a-f]{10}( \(dirty\))?: `r1`, `r5`$", text, re.M)


def test_unknown_rows_are_refused_before_anything_runs(tmp_path):
    done = run_toy(tmp_path, "--rows", "x1")
    assert done.returncode == 2 and "write rN" in done.stderr
    assert not (tmp_path / "toy.json").exists()


def test_merge_rule_in_process():
    setting = Setting(seq_len=4)
    results = Results.new(Path("/nonexistent/x.json"), "x", setting)
    row = {"setting": setting.as_dict(), "commit": "a" * 40, "dirty": False}
    results.merge({"row": "a", "ppl": 1.0, **row})
    results.merge({"row": "b", "ppl": 2.0, **row})
    results.merge({"row": "a", "ppl": 3.0, **row})
    assert [(r["row"], r["ppl"]) for r in results.rows] == [("a", 3.0), ("b", 2.0)]
    with pytest.raises(HarnessError, match="measured under"):
        results.merge({"row": "c", "ppl": 1.0, **row, "setting": {"seq_len": 8}})
    results.add_command("python bench/x.py --rows a z", ["a", "z"])
    assert results.missing(["a", "b", "y"]) == ["y", "z"]


def test_open_refuses_another_setting_bench_or_format(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": harness.FORMAT, "bench": "x", "setting": {"seq_len": 4}, "commands": [], "rows": []}))
    assert Results.open(path, "x", Setting(seq_len=4)).rows == []
    with pytest.raises(HarnessError, match=r"measured under \{seq_len 4\}, not \{seq_len 8\}: pass --out .*x-seqlen8"):
        Results.open(path, "x", Setting(seq_len=8))
    with pytest.raises(HarnessError, match="rows of bench/x, not of bench/y"):
        Results.open(path, "y", Setting(seq_len=4))
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(HarnessError, match="not a results file of the bench harness"):
        Results.open(path, "x", Setting(seq_len=4))


def test_config_key_ignores_the_recipe_name_and_default_bits():
    from quantnpu.pipeline import PAPER, STATIC
    from quantnpu.passes.learn_encodings import StageOneConfig

    paper = RowConfig("8-8-8", (), PAPER).as_dict()  # named "paper", bits 4-8-8 (the CLI's default)
    static = RowConfig("8-8-8", (), STATIC.replace(bits="8-8-8", promote_fraction=0.1, stage_one=StageOneConfig())).as_dict()
    assert paper != static and harness.config_key(paper) == harness.config_key(static)
    assert harness.config_key(RowConfig("8-8-8", (), STATIC).as_dict()) != harness.config_key(static)
