#!/usr/bin/env python3
"""One-off: bring the results files measured before bench/harness.py into its format, numbers unchanged.

For each row: every key it had is kept as it was; added are `config` (rebuilt from the row's name by
the bench's own parser, `config_source` says so), `setting` (the file's), and `commit`: the commit
that added the row's measured value to its results file (`git log -S <value> -- <file>`, the earliest;
`commit_source` says so), or "unknown (before the harness)" when history does not have it; `dirty` is
unknown (null). File-level keys the harness has no place for are kept under `before_harness`.
Commands are kept, each with the rows it named. Then the markdown is rewritten by the bench's writer.

    python bench/migrate_results.py            # every committed results file of a user-run bench

Kept in the repository as the record of how the rows of bench/results/ got their commits.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
from harness import FORMAT, RESULTS, UNKNOWN_COMMIT, Results, Setting  # noqa: E402

COMMIT_SOURCE = "git log -S: the commit that added this value to {path}"
CONFIG_SOURCE = "rebuilt from the row's name by the bench's parser when the file was migrated to the harness"
recovered = {"commit": 0, "unknown": 0}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], stdout=subprocess.PIPE, text=True, check=True).stdout.strip()


def commit_adding(value, *paths: str) -> tuple[str, str | None]:
    """The earliest commit whose diff of `paths` adds the JSON text of `value`."""
    text = value if isinstance(value, str) else json.dumps(value)
    for path in paths:
        found = git("log", "-S", text, "--reverse", "--format=%H", "--", path).splitlines()
        if found:
            recovered["commit"] += 1
            return found[0], COMMIT_SOURCE.format(path=path)
    recovered["unknown"] += 1
    return UNKNOWN_COMMIT, None


def rows_named(command: str, pte_prefix: bool = False) -> list[str]:
    """The rows a recorded command line names (its --rows / --runs arguments; --pte ROW as pte:ROW)."""
    rows, flag = [], None
    for word in shlex.split(command.split(" ; ")[0].split("  #")[0]):
        if word.startswith("--"):
            flag = word
            continue
        if flag in ("--rows", "--runs"):
            rows.append(word)
        elif flag == "--pte" and pte_prefix:
            rows.append(f"pte:{word}")
    return rows


def finish(bench, row: dict, setting: Setting, value, path: str, config_row: str | None = None) -> dict:
    commit, source = commit_adding(value, path)
    row.update({"config": bench.config(config_row or row["row"], setting).as_dict(), "config_source": CONFIG_SOURCE,
                "setting": setting.as_dict(), "commit": commit, "dirty": None})
    if source:
        row["commit_source"] = source
    return row


def save(bench, name: str, setting: Setting, commands: list[dict], rows: list[dict], before: dict) -> None:
    commands = [{**c, "before_harness": True} for c in commands]
    results = Results(RESULTS / f"{name}.json", {"format": FORMAT, "bench": bench.name, "setting": setting.as_dict(),
                                                  "commands": commands, "rows": rows,
                                                  **({"before_harness": before} if before else {})})
    after_write, bench.after_write = bench.after_write, None  # figures are left as they were committed
    try:
        results.write(bench)
    finally:
        bench.after_write = after_write


def table_like(module, name: str, rename_setting=None, reuse_from: dict | None = None) -> None:
    """table1, ablation and fig4: rows already carry `row`; same_as rows take the source's commit and config."""
    bench = module.BENCH
    old = json.loads((RESULTS / f"{name}.json").read_text())
    values = dict(old["setting"])
    if "last_word_documents" in values:
        values["last_word"] = values.pop("last_word_documents")
    setting = Setting(**values)
    rows = []
    for r in old["rows"]:
        r = dict(r)
        if r.get("same_as"):
            source_name, source_row = r["same_as"].split(" ", 1)
            source_bench = reuse_from[source_name]
            source = json.loads((RESULTS / f"{source_name}.json").read_text())
            source_setting = Setting.from_dict(source["setting"])
            commit, why = commit_adding(r["ppl"], f"bench/results/{source_name}.json")
            r.update({"config": source_bench.config(source_row, source_setting).as_dict(), "config_source": CONFIG_SOURCE,
                      "setting": source_setting.as_dict(), "commit": commit, "dirty": None})
            if why:
                r["commit_source"] = why
        else:
            finish(bench, r, setting, r["ppl"], f"bench/results/{name}.json")
        rows.append(r)
    commands = [{"command": c, "rows": rows_named(c)} for c in old["commands"]]
    save(bench, name, setting, commands, rows, {k: v for k, v in old.items() if k not in ("rows", "commands", "setting")})


def smoothing() -> None:
    import smoothing as module

    bench = module.BENCH
    old = json.loads((RESULTS / "smoothing.json").read_text())
    setting = Setting(seq_len=old["eval"]["seq_len"], eval_windows=old["eval"]["windows"], calib_windows=old["calibration"]["windows"],
                      steps=old["stage_one_config"]["steps"], pte_seq_len=old["pte_eval"]["seq_len"], pte_windows=old["pte_eval"]["windows"])
    assert old["calibration"]["seq_len"] == old["eval"]["seq_len"]
    assert old["pte_eval"]["calibration_windows"] == setting.calib_windows * setting.seq_len // setting.pte_seq_len
    path = "bench/results/smoothing.json"
    rows = [finish(bench, {"row": "float", "ppl": old["float"]}, setting, old["float"], path)]
    rows += [finish(bench, dict(r), setting, r["ppl"], path) for r in old["rows"]]
    rows += [finish(bench, {**r, "row": f"pte:{r['row']}"}, setting, r["pte"], path) for r in old["pte"]]
    commands = [{"command": c, "rows": rows_named(c, pte_prefix=True)} for c in old["commands"]]
    before = {k: v for k, v in old.items() if k not in ("rows", "pte", "commands", "command", "eval", "calibration", "float", "pte_eval")}
    save(bench, "smoothing", setting, commands, rows, before)


def stage_one() -> None:
    import stage_one as module

    bench = module.BENCH
    old = json.loads((RESULTS / "stage_one.json").read_text())
    setting = Setting(seq_len=old["eval"]["seq_len"], eval_windows=old["eval"]["windows"], calib_windows=old["calibration"]["windows"],
                      steps=old["stage_one_config"]["steps"], pte_seq_len=128, pte_windows=4)
    path = "bench/results/stage_one.json"
    rows = [finish(bench, {"row": "float", "ppl": old["float"]}, setting, old["float"], path)]
    for r in old["rows"]:
        name = f"{r['bits']}:{r['row']}"
        if r.get("stage_one"):  # the lr the row ran at is the one its name now builds
            assert r["stage_one"]["lr_rotation"] == harness.rotation_lr(r["bits"]), name
        rows.append(finish(bench, {**r, "row": name, "row_name_before_harness": r["row"]}, setting, r["ppl"], path))
    assert not old["pte"]
    commands = [{"command": c, "rows": [w if not w.endswith(":pte") else f"pte:{w.removesuffix(':pte')}:stage1+mixed10"
                                        for w in rows_named(c)]} for c in old["commands"]]
    before = {k: v for k, v in old.items() if k not in ("rows", "pte", "commands", "command", "eval", "calibration", "float")}
    save(bench, "stage_one", setting, commands, rows, before)


def static() -> None:
    """static.json, with the rows of mixed_precision.json and static_pipeline.json (the same bench in the
    same setting under other --out names): one file, each row its latest measurement with its commit."""
    import static as module

    bench = module.BENCH
    files = ["static", "static_pipeline", "mixed_precision"]  # in the order they were measured (84b79f7, 282c64e, 763305c)
    olds = {f: json.loads((RESULTS / f"{f}.json").read_text()) for f in files}
    for old in olds.values():
        assert (old["eval"], old["calibration"]) == ({"windows": 16, "seq_len": 512}, {"windows": 8, "seq_len": 512})
    setting = Setting(seq_len=512, eval_windows=16, calib_windows=8, pte_seq_len=128, pte_windows=4)

    def name_of(r: dict) -> str:
        if r["overrides"] == ["*.down_proj.input=16"]:
            variant = ":down16"
        elif r.get("promote_fraction"):
            variant = ":p10"
        else:
            variant = ""
        return f"{r['bits']}:{r['rotate']}{variant}"

    results = Results.new(RESULTS / "static.json", "static", setting)
    order = {"static": ["float:none", "float:hadamard", "8-8-8:none", "8-8-8:hadamard", "4-8-8:none", "4-8-8:hadamard", "4-4-8:none",
                        "4-4-8:hadamard", "8-8-8:hadamard:down16"]}
    commands = {
        "static": [{"command": olds["static"]["command"].split(" ; ")[0], "rows": order["static"]},
                   {"command": olds["static"]["command"].split(".pte rows from: ")[1], "rows": ["pte:8-8-8", "pte:4-8-8"]}],
        "mixed_precision": [{"command": olds["mixed_precision"]["command"], "rows": [f"{b}:hadamard:p10" for b in ("8-8-8", "4-8-8", "4-4-8")]}],
        "static_pipeline": [{"command": olds["static_pipeline"]["command"], "rows": order["static"]}],
    }
    before = {}
    for f in files:
        old, path = olds[f], f"bench/results/{f}.json"
        records = [finish(bench, {"row": f"float:{rotate}", "ppl": ppl}, setting, ppl, path) for rotate, ppl in old["float"].items()]
        records += [finish(bench, {**r, "row": name_of(r)}, setting, r["ppl"], path) for r in old["rows"]]
        records += [finish(bench, {**r, "row": f"pte:{r['bits']}"}, setting, r["pte"], path) for r in old.get("pte", [])]
        replaced = []
        for r in records:
            earlier = results.row(r["row"])
            if earlier is not None:
                assert earlier["ppl"] == r["ppl"], r["row"]  # the rerun reproduced it to the last digit
                replaced.append(earlier)
            results.merge(r)
        results.data["commands"] += commands[f]
        before[f] = {k: v for k, v in old.items() if k not in ("rows", "pte", "command", "eval", "calibration", "float", "pte_eval")}
        if replaced:  # the merge rule keeps the latest measurement; the earlier ones (same ppl) are kept here
            before[f]["rows_this_run_replaced"] = replaced
    if "pte_eval" in olds["static"]:
        assert olds["static"]["pte_eval"] == {"windows": 4, "seq_len": 128, "soc": "SM8650"}
    save(bench, "static", setting, results.data["commands"], results.rows, before)
    for f in files[1:]:
        for suffix in (".json", ".md"):
            (RESULTS / f"{f}{suffix}").unlink()


def fidelity() -> None:
    import fidelity as module

    bench = module.BENCH
    old = json.loads((RESULTS / "fidelity.json").read_text())
    ev = old["eval"]
    layers = next(r["agreement"]["layers"] for r in old["rows"] if "agreement" in r)
    setting = Setting(seq_len=ev["seq_len"], eval_windows=ev["windows"], calib_windows=ev["calibration_windows"], steps=32, soc=ev["soc"],
                      agreement_layers=layers)
    path = "bench/results/fidelity.json"
    rows = []
    for r in old["rows"]:
        r = finish(bench, dict(r), setting, r["fake_quant"], path)
        if "agreement" in r:
            a = dict(r["agreement"])
            commit, why = commit_adding(json.dumps(a["summary"])[1:-1], path)  # its latest rerun rewrote the summary
            a.update({"config": r["config"], "config_source": CONFIG_SOURCE, "setting": setting.as_dict(), "commit": commit, "dirty": None})
            if why:
                a["commit_source"] = why
            r["agreement"] = a
        rows.append(r)
    commands = [{"command": c, "rows": rows_named(c)} for c in old["commands"]]
    save(bench, "fidelity", setting, commands, rows, {"versions": old["versions"]})


def rotation() -> None:
    import rotation as module

    bench = module.BENCH
    old = json.loads((RESULTS / "rotation.json").read_text())
    p = old["pte"]
    setting = Setting(seq_len=old["eval"]["seq_len"], eval_windows=old["eval"]["windows"], calib_windows=old["calibration"]["windows"],
                      stats_windows=old["activation_stats"]["windows"], pte_seq_len=p["seq_len"], pte_windows=p["windows"],
                      pte_calib_windows=old["calibration"]["windows"])
    path = "bench/results/rotation.json"
    seconds = old["seconds"]
    rows = []
    for rotate in ("none", "hadamard"):
        f = old["float"][rotate]
        rows.append(finish(bench, {"row": f"float:{rotate}", **f, "passes_seconds": seconds[f"passes ({rotate})"]}, setting, f["ppl"], path))
    for rotate in ("none", "hadamard"):  # the statistics were written with the float rows: that commit
        stats = old["activation_stats"][rotate]
        first = next(iter(stats.values()))
        rows.append(finish(bench, {"row": f"stats:{rotate}", "stats": stats}, setting, first["kurtosis"], path))
    for config, by in old["fake_quant"].items():
        for rotate, f in by.items():
            rows.append(finish(bench, {"row": f"et-{config}:{rotate}", **f,
                                       "calibrate_convert_eval_seconds": seconds[f"{config} calibrate+convert+eval ({rotate})"]},
                               setting, f["ppl"], path))
    rows.append(finish(bench, {"row": f"pte:et-{p['config']}:{p['rotate']}", "et_config": p["config"],
                               **{k: v for k, v in p.items() if k not in ("seq_len", "windows", "config")},
                               "qnn_sdk": old["qnn_sdk"]}, setting, p["pte_ppl"], path))
    commands = [{"command": old["command"].strip(), "rows": list(bench.default_rows)}]
    save(bench, "rotation", setting, commands, rows, {**{k: old[k] for k in ("peak_rss_mib", "packages", "qnn_sdk")},
                                                      "float_relative_difference": old["float"]["relative_difference"]})


def skeleton() -> None:
    import skeleton as module

    bench = module.BENCH
    old = json.loads((RESULTS / "skeleton.json").read_text())
    p = old["pte"]
    setting = Setting(seq_len=old["eval"]["seq_len"], eval_windows=old["eval"]["windows"], calib_windows=old["calibration"]["windows"],
                      pte_seq_len=p["seq_len"], pte_windows=p["windows"], pte_calib_windows=old["calibration"]["windows"])
    path = "bench/results/skeleton.json"
    stages = {s["stage"]: s for s in old["stages"]}

    def stage_list(*names: str) -> list[dict]:
        return [stages[n] for n in names]

    rows = [finish(bench, {"row": "float:eager", **old["float"]["eager"], "stages": stage_list("load model", "ppl eager float")},
                   setting, old["float"]["eager"]["ppl"], path),
            finish(bench, {"row": "float:graph", **old["float"]["exported_graph"], "stages": stage_list("export", "passes", "ppl exported graph")},
                   setting, old["float"]["exported_graph"]["ppl"], path)]
    for config, f in old["fake_quant"].items():
        rows.append(finish(bench, {"row": f"et-{config}", **f, "stages": stage_list(f"{config} calibrate+convert", f"{config} ppl fake-quant")},
                           setting, f["ppl"], path))
    rows.append(finish(bench, {"row": f"pte:et-{p['config']}", "et_config": p["config"],
                               **{k: v for k, v in p.items() if k not in ("seq_len", "windows", "config")},
                               "stages": stage_list("export (pte)", f"{p['config']} calibrate+convert (pte)", "lower to QNN", "load .pte",
                                                    "ppl .pte on HTP simulator"),
                               "qnn_sdk": old["qnn_sdk"]}, setting, p["pte_ppl"], path))
    assert sum(len(r["stages"]) for r in rows) == len(old["stages"])
    commands = [{"command": old["command"].strip(), "rows": list(bench.default_rows)}]
    save(bench, "skeleton", setting, commands, rows, {k: old[k] for k in ("model", "eval", "calibration", "peak_rss_mib", "packages", "qnn_sdk")})


def main() -> int:
    import ablation
    import fig4
    import table1

    done = set()
    for name in ("fidelity", "skeleton", "table1", "ablation", "fig4", "smoothing", "stage_one", "static", "rotation"):  # the files a writer reads first
        data = json.loads((RESULTS / f"{name}.json").read_text())
        if data.get("format") == FORMAT:
            print(f"{name}: already in the harness's format")
            continue
        if name == "table1":
            table_like(table1, "table1")
        elif name == "ablation":
            table_like(ablation, "ablation", reuse_from={"table1": table1.BENCH})
        elif name == "fig4":
            table_like(fig4, "fig4", reuse_from={"table1": table1.BENCH, "ablation": ablation.BENCH})
        else:
            globals()[name]()
        done.add(name)
        print(f"{name}: migrated", flush=True)
    print(f"rows with a recovered commit: {recovered['commit']}, unknown: {recovered['unknown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
