"""quantnpu/models/shapes.py and bench/scale.py: the real configurations, the folders of seeded random
weights (deterministic, loadable, streamed, with the statistics they are drawn to), and the scale
bench's table, fit and refusals. No real-size model is built: counts come from the meta device."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantnpu.models import shapes
from quantnpu.models.shapes import SHAPES, STATISTICS, Shape

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import scale  # noqa: E402

# The model cards' counts; ours count the tied head once, as they do.
PUBLISHED = {"smollm2-135m": 135e6, "smollm2-360m": 360e6, "qwen2.5-0.5b": 0.49e9, "llama-3.2-1b": 1.23e9, "smollm2-1.7b": 1.7e9}

# A shape small enough to write in a second with enough layers (6) to take every knot, and channels
# enough (256: 3 outliers) for the statistics to be measured on it.
SMALL = Shape("small-test", family="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
              rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, source="tests")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_sizes(name):
    count = SHAPES[name].parameter_count()  # on the meta device: no memory
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.03, (name, count)
    assert SHAPES[name].published_parameters == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_transformers_reads_the_configurations_as_written(name):
    """The table's numbers survive transformers' config classes (RoPE theta and scaling included) and a
    round trip through config.json."""
    from transformers import AutoConfig

    s = SHAPES[name]
    config = AutoConfig.for_model(**s.config().to_dict())
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.vocab_size, config.tie_word_embeddings,
            config.max_position_embeddings) == (
        s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads,
        s.head_dim, s.vocab_size, s.tie_word_embeddings, s.max_position_embeddings)
    assert config.rms_norm_eps == pytest.approx(s.rms_norm_eps)
    assert config.rope_parameters["rope_theta"] == s.rope_theta
    if s.rope_scaling:
        assert {k: config.rope_parameters[k] for k, _ in s.rope_scaling} == dict(s.rope_scaling)
    assert s.num_attention_heads % s.num_key_value_heads == 0
    assert s.vocab_size >= shapes.TOKENIZER_SIZE  # SmolLM2's tokenizer fits every folder


def test_the_folder_is_deterministic_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    one = shapes.write_folder("tiny", tmp_path / "one", seed=0)
    again = shapes.write_folder("tiny", tmp_path / "again", seed=0)
    other = shapes.write_folder("tiny", tmp_path / "other", seed=1)
    sharded = shapes.write_folder("tiny", tmp_path / "sharded", seed=0, max_shard_bytes=4 << 20)
    assert _digests(one) == _digests(again)  # same seed, same bytes
    assert _digests(one)["model.safetensors"] != _digests(other)["model.safetensors"]
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert shapes.folder_is_complete(one, "tiny", 0) and not shapes.folder_is_complete(one, "tiny", 1)

    model = AutoModelForCausalLM.from_pretrained(one, dtype=torch.float32, local_files_only=True)
    from_shards = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32, local_files_only=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the table says
    assert sum(p.numel() for p in model.parameters()) == SHAPES["tiny"].parameter_count()
    for (name, a), (_, b) in zip(model.state_dict().items(), from_shards.state_dict().items()):
        assert torch.equal(a, b), name  # the shard layout changes no value
    assert len(AutoTokenizer.from_pretrained(one, local_files_only=True)) <= model.config.vocab_size
    logits = model(torch.arange(16).unsqueeze(0)).logits
    assert torch.isfinite(logits).all() and 1 < logits.std() < 50


def test_a_qwen2_folder_has_its_biases_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    mini = dataclasses.replace(SHAPES["qwen2.5-0.5b"], name="qwen-mini", hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_pretrained(shapes.write_folder(mini, tmp_path / "q", tokenizer=False), local_files_only=True)
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert bias is not None and bias.std().item() == pytest.approx(shapes.BIAS_STD, rel=0.3)


def test_an_unknown_tensor_is_an_error():
    from quantnpu.errors import QuantNpuError

    with pytest.raises(QuantNpuError, match="no weight statistics for tensor 'model.layers.0.mlp.experts.0.weight'"):
        shapes.tensor_recipe(SHAPES["tiny"], "model.layers.0.mlp.experts.0.weight")


def test_the_written_weights_have_the_target_statistics(tmp_path):
    """Per tensor of a written 6-layer shape: each linear's std * sqrt(fan_in) is its kind's c at its depth,
    each norm weight has the target mean and spread outside the outlier channels and the outlier value on
    them (the same channels in every norm), the embedding's scale and outlier columns."""
    from safetensors import safe_open

    folder = shapes.write_folder(SMALL, tmp_path / "small", seed=3, tokenizer=False)
    outliers = shapes.outlier_channels(SMALL, 3)
    assert len(outliers) == shapes.outlier_count(256) == 3
    rest = torch.ones(256, dtype=torch.bool)
    rest[outliers] = False
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert "lm_head.weight" not in names  # tied: the checkpoint holds the embedding once
        for name in names:
            w = f.get_tensor(name).double()
            target = shapes.tensor_recipe(SMALL, name)
            if target["kind"] == "linear":
                assert w.mean().abs() < 0.02 * w.std()
                assert w.std().item() * math.sqrt(w.shape[1]) == pytest.approx(target["c"], rel=0.03), name
            elif target["kind"] == "norm":
                core = w[rest]
                assert core.mean().item() == pytest.approx(target["mean"], abs=0.25 * target["std"] + 1e-3), name
                assert core.std().item() == pytest.approx(target["std"], rel=0.2), name
                assert w[outliers].mean().item() == pytest.approx(target["outlier"], rel=0.15), name
            else:
                assert target["kind"] == "embedding" and name == "model.embed_tokens.weight"
                columns = w.std(0)
                assert columns[rest].mean().item() == pytest.approx(target["std"], rel=0.01)
                assert (columns[outliers] / columns[rest].median()).mean().item() == pytest.approx(target["outlier_ratio"], rel=0.02)
    # the knots as the recipe places them: first and last layers their own, the middle ones in between
    c = STATISTICS["linear_c"]["o_proj"]
    assert [round(shapes.tensor_recipe(SMALL, f"model.layers.{i}.self_attn.o_proj.weight")["c"], 6) for i in (0, 5)] == [c[0], c[-1]]
    middle = [shapes.tensor_recipe(SMALL, f"model.layers.{i}.self_attn.o_proj.weight")["c"] for i in range(1, 5)]
    assert min(c[1:5]) <= min(middle) and max(middle) <= max(c[1:5]) and middle == sorted(middle)  # o_proj grows with depth


def test_writing_streams_the_weights(tmp_path):
    """SmolLM2-135M's shape (0.5 GB of float32) is written at a peak of well under its size above the
    memory the process had: the model is never held."""
    from quantnpu.memory import peak_memory

    s = SHAPES["smollm2-135m"]
    shapes.checkpoint_entries(s)  # transformers' model classes imported before the measurement
    rss = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    with peak_memory() as peak:
        folder = shapes.write_folder(s, tmp_path / "s135", tokenizer=False, max_shard_bytes=256 << 20)
    if not peak.per_stage:
        pytest.skip("the kernel's high-water mark cannot be reset here")
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
    assert size > 500 and len(list(folder.glob("*.safetensors"))) == 3
    assert peak.mib - rss < 128, f"writing {size:.0f} MiB took {peak.mib - rss:.0f} MiB"


def _cached_smollm2() -> Path:
    from quantnpu.models.smollm2 import smollm2_cache_dir

    folder = smollm2_cache_dir()
    if not (folder / "model.safetensors").is_file():
        pytest.skip("SmolLM2-135M is not cached (python -m quantnpu.prepare)")
    return folder


def test_the_statistics_are_smollm2s():
    """STATISTICS is what measure_statistics finds in SmolLM2-135M's weights, and the recipe at
    SmolLM2-135M's shape follows its layer-by-layer profile: each linear kind's c within 8% on average over
    the layers and 35% in any layer (the six knots smooth v_proj's 2.7-3.6 in layers 1-4 to 3.5), each
    norm's mean within 5% on average and 0.1 in any layer."""
    from safetensors import safe_open

    folder = _cached_smollm2()
    assert shapes.measure_statistics(folder) == STATISTICS
    s = SHAPES["smollm2-135m"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for kind in shapes.LINEAR_KINDS:
            block = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            real, drawn = [], []
            for layer in range(s.num_hidden_layers):
                name = f"model.layers.{layer}.{block}.{kind}.weight"
                w = f.get_tensor(name).double()
                real.append(w.std().item() * math.sqrt(w.shape[1]))
                drawn.append(shapes.tensor_recipe(s, name)["c"])
            deviations = [abs(d - r) / r for d, r in zip(drawn, real)]
            assert sum(deviations) / len(deviations) < 0.08 and max(deviations) < 0.35, (kind, real, drawn)
        for kind in shapes.NORM_KINDS:
            real = [shapes.norm_statistics(f.get_tensor(f"model.layers.{i}.{kind}.weight"), 6)["mean"] for i in range(30)]
            drawn = [shapes.tensor_recipe(s, f"model.layers.{i}.{kind}.weight")["mean"] for i in range(30)]
            assert sum(drawn) / 30 == pytest.approx(sum(real) / 30, rel=0.05), kind
            assert max(abs(d - r) for d, r in zip(drawn, real)) < 0.1, (kind, real, drawn)


# ---------------------------------------------------------------------------------------------------
# bench/scale.py


def _row(name: str, parameters: int, peak_gib: float, passes_peak_gib: float, seconds: float) -> dict:
    mib = peak_gib * 1024
    stages = {"write": {"reused": True}, "export": {"seconds": 5.0, "peak_mib": 600.0},
              "load": {"seconds": 1.0, "peak_mib": 500.0}, "passes": {"seconds": seconds, "peak_mib": passes_peak_gib * 1024},
              "lower": {"seconds": 2.0, "peak_mib": mib}}
    passes = [{"name": "FoldNorms", "seconds": 1.0, "peak_mib": passes_peak_gib * 1024 - 10},
              {"name": "LearnEncodings", "seconds": seconds - 1, "peak_mib": passes_peak_gib * 1024}]
    stage, pass_name = scale.peak_owner(stages, passes, max(mib, passes_peak_gib * 1024))
    return {"row": name, "parameters": parameters, "stages": stages, "passes": passes, "run_seconds": seconds + 10,
            "peak_rss_mib": max(mib, passes_peak_gib * 1024), "peak_stage": stage, "peak_pass": pass_name,
            "commands": {"export": f"python tools/export.py --hf {name}"}}


def test_the_table_the_fit_and_who_sets_the_peak():
    # peaks exactly 1 GiB + 3 bytes per parameter: the fit must say so
    rows = [_row("smollm2-135m", 100_000_000, 1 + 3e8 / 2**30, 0.5, 60.0),
            _row("smollm2-360m", 300_000_000, 0.5, 1 + 9e8 / 2**30, 120.0),
            _row("smollm2-1.7b", 1_700_000_000, 1 + 51e8 / 2**30, 2.0, 3600.0)]
    assert (rows[0]["peak_stage"], rows[0]["peak_pass"]) == ("lower", None)
    assert (rows[1]["peak_stage"], rows[1]["peak_pass"]) == ("passes", "LearnEncodings")
    base, slope = scale.fit([(r["parameters"], r["peak_rss_mib"] * 2**20) for r in rows])
    assert base == pytest.approx(2**30, rel=1e-6) and slope == pytest.approx(3.0, rel=1e-6)
    text = "\n".join(scale.body({"rows": rows}))
    assert "| shape | parameters | write | export | load | eval float | passes | lower |" in text
    assert "| `smollm2-360m` | 300.0M | reused | 5.0 s, 0.59 GiB |" in text
    assert "passes (LearnEncodings) |" in text
    assert "**1.00 GiB + 3.00 bytes/parameter** (target: under 4 bytes/parameter above a fixed base: met)" in text
    assert "`smollm2-1.7b`: peak 5.75 GiB (target <= 20 GiB: met), whole run 1.00 h (target <= 4 h: met)" in text
    assert "| LearnEncodings | 59.0 s, 0.50 GiB | 119.0 s, 1.84 GiB | 60.0 min, 2.00 GiB |" in text
    assert "| passes | 1.00 GiB | 0.68 |" in text and "another configuration" not in text
    assert "A line needs rows of two parameter counts" in "\n".join(scale.body({"rows": rows[:1]}))


def test_the_lowering_peak_outside_its_stages_is_named():
    stages = {"export": {"seconds": 1, "peak_mib": 500.0}, "passes": {"seconds": 1, "peak_mib": 900.0}}
    assert scale.peak_owner(stages, [], 1200.0) == ("lower (outside its stages)", None)
    assert scale.peak_owner({**stages, "export": {"seconds": 1, "peak_mib": 2000.0}}, [], 1200.0) == ("export", None)


def test_the_trained_row_exports_smollm2_itself(tmp_path):
    commands = scale.row_commands("smollm2-135m-real", scale.SETTING, tmp_path)
    assert set(commands) == {"export", "lower"}  # nothing to write
    assert commands["export"][2:5] == ["--model", "smollm2", "--seq-len"] and "--tokenizer" not in commands["lower"]
    assert scale.config("smollm2-135m-real", scale.SETTING).plan == "8-8-8"


def test_an_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="one of the shapes"):
        scale.config("gpt-5", scale.SETTING)


def _scale(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={**os.environ, scale.WORK_ENV: ""})


def test_dry_run_writes_the_folder_and_prints_the_commands(tmp_path):
    work = tmp_path / "work"
    done = _scale(tmp_path, "--rows", "tiny", "--work", str(work), "--seq-len", "64", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert shapes.folder_is_complete(work / "tiny-seed0", "tiny", 0)
    lines = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    assert lines == [
        f"{sys.executable} {ROOT}/tools/export.py --hf {work}/tiny-seed0 --seq-len 64 -o {work}/tiny-seed0-s64.pt2 --force",
        f"{sys.executable} {ROOT}/tools/lower.py {work}/tiny-seed0-s64.pt2 -o {work}/tiny-seed0-s64.quantnpu-8-8-8.pte "
        f"--bits 8-8-8 --calib-windows 16 --tokenizer {work}/tiny-seed0 --eval --eval-windows 1"]
    assert not list(tmp_path.glob("*.json"))  # nothing measured, nothing recorded


def test_rows_of_another_setting_are_not_merged(tmp_path):
    out = tmp_path / "scale"
    out.with_suffix(".json").write_text(json.dumps({"format": "quantnpu-bench/1", "bench": "scale", "setting": scale.SETTING.as_dict(),
                                                    "commands": [], "rows": []}))
    done = _scale(tmp_path, "--rows", "tiny", "--out", str(out), "--work", str(tmp_path / "work"), "--eval-windows", "2")
    assert done.returncode == 2 and "eval_windows 1" in done.stderr and "eval_windows 2" in done.stderr, done.stderr
    assert not (tmp_path / "work").exists()  # refused before anything ran


@pytest.mark.slow
def test_the_bench_end_to_end_on_the_tiny_shape(tmp_path):
    """bench/scale.py --rows tiny as a user runs it: the folder, the export, the lowering with --eval on the
    simulator, then the row with every stage's seconds and peak (~3 minutes)."""
    out = tmp_path / "scale"
    done = _scale(tmp_path, "--rows", "tiny", "--out", str(out), "--work", str(tmp_path / "work"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["parameters"] == SHAPES["tiny"].parameter_count()
    for stage in ("write", "export", "load", "eval float", "passes", "lower", "eval fake-quant", "eval .pte"):
        assert row["stages"][stage]["seconds"] > 0 and row["stages"][stage]["peak_mib"] > 100, stage
    assert row["passes"] and all(p["peak_mib"] > 100 for p in row["passes"])
    assert row["peak_rss_mib"] >= max(s["peak_mib"] for n, s in row["stages"].items() if n != "write")
    assert row["run_seconds"] >= row["stages"]["export"]["seconds"] + row["lower"]["seconds"] - 1e-3
    assert set(row["commands"]) == {"write", "export", "lower"} and row["setting"] == scale.SETTING.as_dict()
    assert "| `tiny` | 3.2M |" in out.with_suffix(".md").read_text()
