"""LearnEncodings (stage one): where the quantizers go (graph diff), what is learned and written
back, that stage two keeps it, checkpoints and resume, seeds, Ctrl-C, and torch.distributed; and
that learning lowers the fake-quant error on a graph with planted outliers, by a margin a flipped
gradient sign would break."""

import copy
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F

from quantnpu.diagnostics import QuantNpuWarning
from quantnpu.errors import Interrupted, PassFailedError, QuantNpuError
from quantnpu.graph.equivalence import logits_of, sample_token_ids
from quantnpu.graph.meta import node_info, nodes_by_role, tensor_quant
from quantnpu.graph.text import graph_diff, graph_text
from quantnpu.passes import BakeRotations, PassManager, StaticCalibration
from quantnpu.passes.fuse_rotations import R1_NAME
from quantnpu.passes.learn_encodings import (
    LearnEncodings, StageOneConfig, insert_stage_one_quantizers, rotation_parameters,
)
from quantnpu.pipeline import STATIC, fake_quant_passes, find_pass, float_passes, pipeline
from quantnpu.quantizers.bit_plan import BitPlan
from quantnpu.quantizers.learnable import orthogonality_error
from tests.graph_testing import tiny_graph

PLAN = BitPlan.parse("4-8-8")


def fused_graph(layers: int = 2, seq_len: int = 16) -> torch.fx.GraphModule:
    """A tiny Llama after FuseRotations: R1/R2 are parameters the weights are computed from."""
    return PassManager(float_passes("hadamard"), stop_after="FuseRotations").run(tiny_graph("llama", layers=layers, seq_len=seq_len))


def calibration(gm, count: int = 4):
    return [sample_token_ids(gm, seed) for seed in range(count)]


def learned(gm) -> dict:
    """Every learned encoding by linear role, and the rotation parameters."""
    found = {}
    for role, node in nodes_by_role(gm).items():
        record = tensor_quant(node)
        if record is not None and (record.learned_input or record.learned_weight):
            found[role] = (record.learned_input, record.learned_weight)
    rotations = {name: p.detach().clone() for name, p in rotation_parameters(gm)}
    return {"encodings": found, "rotations": rotations}


def run_stage_one(gm, config: StageOneConfig, batches=None, plan: BitPlan = PLAN):
    stage_one = LearnEncodings(plan, batches or calibration(gm), config)
    out = PassManager([stage_one]).run(gm)
    return out, stage_one


def test_selective_quantizers_graph_diff():
    """Selective stage one on one layer: the shared q/k/v input, o_proj's and gate/up's inputs at A
    (gate_proj's raised to 16 by HTP: it writes 16 bits), every layer weight at W. Nothing on
    down_proj's input, linear outputs, K/V, or lm_head."""
    gm = fused_graph(layers=1)
    before = graph_text(gm)
    insert_stage_one_quantizers(gm, PLAN, "selective")
    diff = graph_diff(before, graph_text(gm))
    added = [line for line in diff.splitlines() if line.startswith("+%quantnpu_stage_one")]
    names = sorted(line.split(": ")[0].lstrip("+%") for line in added)
    assert names == sorted([
        "quantnpu_stage_one_layers_0_q_proj_input", "quantnpu_stage_one_layers_0_o_proj_input",
        "quantnpu_stage_one_layers_0_gate_proj_input", "quantnpu_stage_one_layers_0_up_proj_input",
        *(f"quantnpu_stage_one_layers_0_{k}_weight" for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ])
    by_role = nodes_by_role(gm)
    # every changed linear reads a quantizer; lm_head and down_proj's input do not
    for role in ("layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj", "layers.0.o_proj", "layers.0.gate_proj", "layers.0.up_proj"):
        assert by_role[role].args[0].op == "call_module" and by_role[role].args[1].op == "call_module", role
    assert by_role["layers.0.down_proj"].args[0].op != "call_module"
    assert by_role["layers.0.down_proj"].args[1].op == "call_module"
    assert by_role["lm_head"].args[0].op != "call_module" and by_role["lm_head"].args[1].op != "call_module"
    # q, k and v share one quantizer; nothing reads a linear's output through a quantizer
    assert by_role["layers.0.q_proj"].args[0] is by_role["layers.0.k_proj"].args[0] is by_role["layers.0.v_proj"].args[0]
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith("quantnpu_stage_one"):
            assert node.args[0].target != torch.ops.aten.linear.default, node.name
    modules = {name: gm.get_submodule(name) for name in names}
    assert modules["quantnpu_stage_one_layers_0_q_proj_input"].bits == 8
    assert modules["quantnpu_stage_one_layers_0_gate_proj_input"].bits == 16   # legalized: gate_proj writes 16
    assert modules["quantnpu_stage_one_layers_0_q_proj_weight"].bits == 4
    assert modules["quantnpu_stage_one_layers_0_q_proj_weight"].axis == 0
    assert "+%quantnpu_stage_one_layers_0_q_proj_input: f32[1,16,64] = quantnpu_stage_one_layers_0_q_proj_input(%mul_" in diff


def test_joint_adds_down_proj_inputs_and_lm_head():
    gm = fused_graph(layers=1)
    sites = insert_stage_one_quantizers(gm, PLAN, "joint")
    roles = {(node_info(s.linears[0]).role, s.what) for s in sites}
    assert ("layers.0.down_proj", "input") in roles and ("lm_head", "input") in roles and ("lm_head", "weight") in roles


def test_stage_one_learns_writes_back_and_keeps_the_function():
    gm = fused_graph()
    reference = copy.deepcopy(gm)
    r1_before = getattr(gm, R1_NAME).detach().clone()
    out, stage_one = run_stage_one(gm, StageOneConfig(steps=4, lr_scale=0.05))   # the verifier runs
    assert not any(n.op == "call_module" and n.target.startswith("quantnpu_stage_one") for n in out.graph.nodes)
    assert not any(name.startswith("quantnpu_stage_one") for name, _ in out.named_modules())
    before = dict(reference.named_parameters())
    assert all(p.requires_grad == before[name].requires_grad for name, p in out.named_parameters())  # as they were
    r1 = getattr(out, R1_NAME).detach()
    assert not torch.equal(r1, r1_before) and orthogonality_error(r1) < 1e-5
    assert stage_one.orthogonality < 1e-5
    found = learned(out)["encodings"]
    assert set(found) == {f"layers.{i}.{k}" for i in range(2) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert found["layers.0.down_proj"][0] is None and found["layers.0.q_proj"][0].bits == 8
    assert found["layers.0.q_proj"][1].bits == 4 and len(found["layers.0.q_proj"][1].scale) == 64
    # the scales moved from their initialization
    initial = {s.name: s.module.initial_scale for s in stage_one.sites}
    moved = [s for s in stage_one.sites if not torch.equal(s.module.scale.detach(), initial[s.name])]
    assert moved
    ids = sample_token_ids(gm, 7)
    assert torch.allclose(out(ids)[0], reference(ids)[0], rtol=1e-4, atol=1e-4)
    assert len(stage_one.history) == 4


def test_summary_means_the_loss_over_the_first_and_last_pass_of_the_windows():
    gm = fused_graph(layers=1)
    _, stage_one = run_stage_one(gm, StageOneConfig(steps=5), batches=calibration(gm, 2))
    summary = stage_one.summary()
    loss = [r.task_loss for r in stage_one.history]
    assert summary["steps"] == 5 and summary["steps_per_pass"] == 2 and summary["loss"] == [round(x, 5) for x in loss]
    assert summary["loss_first_pass_mean"] == pytest.approx((loss[0] + loss[1]) / 2)
    assert summary["loss_last_pass_mean"] == pytest.approx((loss[3] + loss[4]) / 2)
    assert summary["orthogonality"] == stage_one.orthogonality
    assert LearnEncodings(PLAN, calibration(gm, 2), StageOneConfig(steps=1)).summary() == {"steps": 0}


def test_stage_two_keeps_the_learned_encodings_frozen():
    gm = tiny_graph("llama", layers=2, seq_len=16)
    batches = calibration(gm)
    passes = pipeline(PLAN, batches, STATIC, stage_one=StageOneConfig(steps=2))
    fq = PassManager(passes, stop_after="StaticCalibration").run(gm)
    calibrated = find_pass(passes, StaticCalibration)
    assert calibrated.learned_used > 0 and not calibrated.learned_ignored
    for node in fq.graph.nodes:
        record = tensor_quant(node)
        if node.target != torch.ops.aten.linear.default or record is None or record.learned_input is None:
            continue
        # what the fake-quant graph applies: the observers on the linear's input edge and weight
        assert node.args[0].op == "call_module" and node.args[1].op == "call_module"
        assert fq.get_submodule(node.args[0].target).encoding == record.learned_input, node_info(node).role
        assert fq.get_submodule(node.args[1].target).encoding == record.learned_weight, node_info(node).role


def test_same_seed_same_encodings_and_resume_is_bit_identical(tmp_path):
    config = StageOneConfig(steps=6, lr_scale=0.05, batch=2, checkpoint=str(tmp_path / "a.ckpt"), checkpoint_every=2)
    first = learned(run_stage_one(fused_graph(), config)[0])
    again = learned(run_stage_one(fused_graph(), config)[0])
    _assert_identical(first, again)
    # interrupted by Ctrl-C during step 3 (of 6): the step finishes, a checkpoint is written
    gm = fused_graph()
    interrupted_config = StageOneConfig(steps=6, lr_scale=0.05, batch=2, checkpoint=str(tmp_path / "b.ckpt"), checkpoint_every=4)
    stage_one = LearnEncodings(PLAN, calibration(gm), interrupted_config)
    pressed = []

    def press_ctrl_c(module, args, output):
        if len(stage_one.history) == 2 and not pressed:   # the first forward of step 3
            pressed.append(True)
            signal.raise_signal(signal.SIGINT)

    original_call = stage_one._train

    def train_with_ctrl_c(graph, checkpoint):
        graph.get_submodule("quantnpu_stage_one_layers_0_q_proj_input").register_forward_hook(press_ctrl_c)
        return original_call(graph, checkpoint)

    stage_one._train = train_with_ctrl_c
    with pytest.raises(Interrupted, match="after step 3 of 6.*--resume"):
        PassManager([stage_one]).run(gm)
    assert (tmp_path / "b.ckpt").is_file()
    resumed_config = StageOneConfig(steps=6, lr_scale=0.05, batch=2, checkpoint=str(tmp_path / "b.ckpt"), resume=True)
    resumed_gm, resumed = run_stage_one(fused_graph(), resumed_config)
    assert [r.step for r in resumed.history] == list(range(6))
    _assert_identical(first, learned(resumed_gm))


def _assert_identical(a: dict, b: dict) -> None:
    assert a["encodings"] == b["encodings"]
    assert a["rotations"].keys() == b["rotations"].keys()
    for name in a["rotations"]:
        assert torch.equal(a["rotations"][name], b["rotations"][name]), name


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    path = str(tmp_path / "c.ckpt")
    run_stage_one(fused_graph(), StageOneConfig(steps=2, checkpoint=path))
    with pytest.raises(PassFailedError, match="different stage-one run \\(config differs\\)"):
        run_stage_one(fused_graph(), StageOneConfig(steps=3, checkpoint=path, resume=True))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(PassFailedError, match="junk.ckpt: not a readable stage-one checkpoint"):
        run_stage_one(fused_graph(), StageOneConfig(steps=2, checkpoint=str(tmp_path / "junk.ckpt"), resume=True))


@pytest.mark.parametrize("bad", [dict(optimize="all"), dict(steps=0), dict(init="mean"), dict(simulate="int"),
                                 dict(local_steps=9, steps=4), dict(resume=True), dict(lr_scale=-1.0)])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(QuantNpuError, match="stage one"):
        StageOneConfig(**bad)


def test_rotations_mode_learns_only_rotations_and_dynamic_writes_no_input_encodings():
    gm, stage_one = run_stage_one(fused_graph(), StageOneConfig(optimize="rotations", steps=2))
    assert not learned(gm)["encodings"] and stage_one.orthogonality < 1e-5
    gm, _ = run_stage_one(fused_graph(), StageOneConfig(simulate="dynamic", loss="kl", steps=2))
    found = learned(gm)["encodings"]
    assert found and all(inp is None and weight is not None for inp, weight in found.values())


def test_unrotated_graph_learns_weight_scales_only():
    gm = PassManager(float_passes("none")).run(tiny_graph("llama", layers=1, seq_len=16))
    out, stage_one = run_stage_one(gm, StageOneConfig(steps=2), plan=BitPlan.parse("8-8-8"))  # unrotated: >= 8 bits
    assert not rotation_parameters(out) and {s.what for s in stage_one.sites} == {"weight"}


def _distributed_rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One torchrun-like rank: the same graph, its share of every step's windows."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gm, _ = run_stage_one(fused_graph(), StageOneConfig(steps=3, batch=2, lr_scale=0.05))
        if rank == 0:
            torch.save(learned(gm), out_file)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_learn_what_one_process_learns_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    single, _ = run_stage_one(fused_graph(), StageOneConfig(steps=3, batch=2, lr_scale=0.05))
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_distributed_rank, args=(2, str(tmp_path / "rendezvous"), out_file), nprocs=2, join=True)
    expected, distributed = learned(single), torch.load(out_file, weights_only=False)
    assert distributed["encodings"].keys() == expected["encodings"].keys()
    for role, (inp, weight) in expected["encodings"].items():
        got_inp, got_weight = distributed["encodings"][role]
        for want, got in ((inp, got_inp), (weight, got_weight)):
            if want is None:
                assert got is None
            else:
                assert got.bits == want.bits
                assert torch.allclose(torch.tensor(got.scale), torch.tensor(want.scale), rtol=1e-5), role
    for name, value in expected["rotations"].items():
        assert torch.allclose(distributed["rotations"][name], value, atol=1e-6), name


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "et-llama"])
def test_stage_one_through_the_whole_pipeline_on_other_families(family):
    """Biases (Qwen2), q/k norms (Qwen3), R1 skipped for sandwich norms (Gemma-2: only R2 and o_proj's
    input learned), ExecuTorch's Llama: stage one runs, keeps the function (verifier), and stage two
    keeps every learned encoding."""
    from quantnpu.models.export import export_causal_lm
    from quantnpu.models.tiny import tiny_model

    gm = export_causal_lm(tiny_model(family), 16).module()
    passes = pipeline(PLAN, calibration(gm, 3), STATIC, promote_fraction=0.5, stage_one=StageOneConfig(steps=2))
    if family == "gemma2":
        with pytest.warns(QuantNpuWarning, match=r"R1 not applied, only R2: %\w+ \(layers\.0\.attention_output_norm: an RMSNorm"):
            PassManager(passes).run(gm)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", QuantNpuWarning)   # R1 applies: no rule broken, nothing skipped
            PassManager(passes).run(gm)
    learner, calibrated = find_pass(passes, LearnEncodings), find_pass(passes, StaticCalibration)
    assert len(learner.history) == 2 and learner.orthogonality < 1e-5
    assert calibrated.learned_used > 0 and not calibrated.learned_ignored


# -- stage one learns: the fake-quant error against no learning, and with the gradient's sign flipped --

def planted_outlier_graph(layers: int = 2, seq_len: int = 32) -> torch.fx.GraphModule:
    """A tiny Llama with outliers where real LLMs have them: two residual-stream channels 25x
    larger (embedding columns 3 and 40: after RMSNorm they dominate every q/k/v and gate/up input)
    and, per layer, two value channels 20x larger on o_proj's input (v_proj rows 5 and 20 x20, the
    o_proj columns that read them /20: the same function there)."""
    gm = tiny_graph("llama", layers=layers, seq_len=seq_len)
    params = dict(gm.named_parameters())
    head_dim, group = 16, 2   # tiny Llama: 4 query heads, 2 KV heads of 16
    with torch.no_grad():
        params["model.model.embed_tokens.weight"][:, [3, 40]] *= 25.0
        for layer in range(layers):
            v = params[f"model.model.layers.{layer}.self_attn.v_proj.weight"]
            o = params[f"model.model.layers.{layer}.self_attn.o_proj.weight"]
            for row in (5, 20):
                kv_head, channel = divmod(row, head_dim)
                v[row] *= 20.0
                for head in range(kv_head * group, (kv_head + 1) * group):
                    o[:, head * head_dim + channel] /= 20.0
    return gm


@pytest.fixture(scope="module")
def planted():
    """(the float graph, it after FuseRotations, 4 calibration windows, 4 held-out windows, what
    stage one without learning (lr 0: the initial scales and the Hadamard R1/R2) leaves)."""
    float_gm = planted_outlier_graph()
    fused = PassManager(float_passes("hadamard"), stop_after="FuseRotations").run(copy.deepcopy(float_gm))
    calibration = [sample_token_ids(fused, seed) for seed in range(4)]
    held_out = [sample_token_ids(fused, 100 + seed) for seed in range(4)]
    data = {"float": float_gm, "fused": fused, "calibration": calibration, "held_out": held_out}
    data["none"] = _fake_quant_errors(data, _stage_one(data, StageOneConfig(steps=32, lr_scale=0.0, lr_rotation=0.0))[0])
    return data


def _stage_one(data, config: StageOneConfig):
    learner = LearnEncodings(PLAN, data["calibration"], config)
    return PassManager([learner], verify=False).run(copy.deepcopy(data["fused"])), learner


def _with_learned_quantizers(gm):
    """A copy of a graph after stage one with its quantizers put back at the encodings it wrote:
    the fake-quant graph stage one ended with (`enabled=False` on them gives the float graph)."""
    gm = copy.deepcopy(gm)
    sites = insert_stage_one_quantizers(gm, PLAN, "selective")
    for site in sites:
        record = tensor_quant(site.linears[0])
        encoding = record.learned_input if site.what == "input" else record.learned_weight
        with torch.no_grad():
            site.module.initial_scale.copy_(torch.tensor(encoding.scale, dtype=torch.float32))
            site.module.relative.fill_(1.0)
    return gm, sites


def _fake_quant_errors(data, learned, keys=("kl", "kl_held_out", "local_mse_held_out", "ce", "logits_error")) -> dict:
    """What stage one is to lower, measured on the graph it leaves:
    - `kl`, `kl_held_out`: the mean KL of the stage-one fake-quant graph's next-token distribution
      to the float graph's (the `loss="kl"` objective) on the calibration / held-out windows;
    - `local_mse_held_out`: the sum over its activation quantizers of mean((x - x_hat)^2) (the
      local loss) on the held-out windows;
    - `ce`: its next-token cross-entropy on the calibration windows (the `loss="ce"` objective);
    - `logits_error`: relative logits error of the finished fake-quant graph (rotations baked,
      stage two calibrating the rest) to the float graph, on the held-out windows.
    Only `keys` are measured (the last costs a stage-two calibration)."""
    gm, sites = _with_learned_quantizers(learned)

    def set_enabled(enabled):
        for site in sites:
            site.module.enabled = enabled

    found = {}
    with torch.no_grad():
        for key, windows in (("kl", data["calibration"]), ("kl_held_out", data["held_out"])):
            total, local = 0.0, 0.0
            for window in windows:
                set_enabled(False)
                target = F.log_softmax(logits_of(gm(window)).float(), -1)
                set_enabled(True)
                for site in sites:
                    site.module.record_error = site.what == "input"
                log_q = F.log_softmax(logits_of(gm(window)).float(), -1)
                total += float(F.kl_div(log_q.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"))
                local += sum(float(site.module.last_error) for site in sites if site.what == "input")
            found[key] = total / len(windows)
        found["local_mse_held_out"] = local / len(data["held_out"])
        for site in sites:
            site.module.record_error = False
        total = 0.0
        for window in data["calibration"]:
            logits = logits_of(gm(window)).float()
            total += float(F.cross_entropy(logits[0, :-1], window[0, 1:]))
        found["ce"] = total / len(data["calibration"])
        if "logits_error" not in keys:
            return found
        fq = PassManager([BakeRotations()] + fake_quant_passes(PLAN, data["calibration"]), verify=False).run(copy.deepcopy(learned))
        total = 0.0
        for window in data["held_out"]:
            reference = logits_of(data["float"](window))
            total += float((logits_of(fq(window)) - reference).norm() / reference.norm())
        found["logits_error"] = total / len(data["held_out"])
    return found


# Stage-one settings and what each must lower, as a fraction of no learning's value. Measured on
# the planted graph (learned / none; with the gradient sign flipped):
# - selective, KL loss, the shipped learning rates: kl 0.15, kl_held_out 0.19, logits_error 0.62
#   (flipped: 59, 52, 8.1; only the rotation gradient flipped: 88, 77, 10);
# - scales alone (lr_rotation 0), KL loss, lr_scale 20 (at the shipped 0.01 the scales move < 0.1%
#   in 32 steps here): kl 0.19, kl_held_out 0.37 (flipped: 3.9, 3.4);
# - selective, KL loss, the local loss in every step at weight 100: local_mse_held_out 0.61
#   (flipped: 13600; the local term's sign alone flipped: 13600);
# - selective, the shipped CE loss and learning rates: ce 0.71 (flipped: 1.15). On random tokens CE
#   learning fits the tokens, not the float model, so only the CE itself is a check here.
LEARNING = {
    "selective-kl": (dict(loss="kl"), {"kl": 0.5, "kl_held_out": 0.5, "logits_error": 0.8}),
    "scales-only-kl": (dict(loss="kl", lr_scale=20.0, lr_rotation=0.0), {"kl": 0.5, "kl_held_out": 0.7}),
    "local-kl": (dict(loss="kl", local_steps=32, local_weight=100.0), {"local_mse_held_out": 0.8}),
    "selective-ce": (dict(loss="ce"), {"ce": 0.85}),
}


def _assert_learning_lowers_the_error(learned: dict, none: dict, bounds: dict) -> None:
    for key, bound in bounds.items():
        assert learned[key] < bound * none[key], f"{key}: learned {learned[key]:.5g}, no learning {none[key]:.5g} (bound x{bound})"


def _flip_gradient_sign(monkeypatch, scales: bool = True, rotations: bool = True) -> None:
    """Stage one's optimizers climb instead of descending: SGD on the scales with `maximize`,
    Cayley SGD on R1/R2 stepping along the negated gradient."""
    original = LearnEncodings._optimizers

    def flipped(self, gm):
        params, rotation_params, scale_opt, rotation_opt = original(self, gm)
        if scales and scale_opt is not None:
            for group in scale_opt.param_groups:
                group["maximize"] = True
        if rotations and rotation_opt is not None:
            step = rotation_opt.step

            def ascend(closure=None):
                for p in rotation_params:
                    if p.grad is not None:
                        p.grad.neg_()
                return step(closure)

            rotation_opt.step = ascend
        return params, rotation_params, scale_opt, rotation_opt

    monkeypatch.setattr(LearnEncodings, "_optimizers", flipped)


@pytest.mark.parametrize("case", list(LEARNING))
def test_stage_one_lowers_the_fake_quant_error_against_no_learning(planted, case):
    """On a graph with planted outliers, 32 steps of stage one leave a fake-quant graph whose loss
    (KL to the float graph, or CE) and quantization error (held-out KL, the finished fake-quant
    graph's logits error) are clearly below what the same stage one with learning rate 0 leaves."""
    settings, bounds = LEARNING[case]
    learned = _fake_quant_errors(planted, _stage_one(planted, StageOneConfig(steps=32, **settings))[0], tuple(bounds))
    _assert_learning_lowers_the_error(learned, planted["none"], bounds)


@pytest.mark.parametrize("case,scales,rotations", [("selective-kl", True, True), ("selective-kl", False, True),
                                                   ("scales-only-kl", True, False), ("local-kl", True, True),
                                                   ("selective-ce", True, True)])
def test_the_learning_check_fails_with_the_gradient_sign_flipped(planted, monkeypatch, case, scales, rotations):
    """The check above is one a sign error breaks: with stage one climbing its loss (all of it, or
    only the rotations' step), every measured error ends above no learning's, and the check fails."""
    _flip_gradient_sign(monkeypatch, scales, rotations)
    settings, bounds = LEARNING[case]
    learned = _fake_quant_errors(planted, _stage_one(planted, StageOneConfig(steps=32, **settings))[0], tuple(bounds))
    for key in bounds:
        assert learned[key] > planted["none"][key], (key, learned[key], planted["none"][key])
    with pytest.raises(AssertionError):
        _assert_learning_lowers_the_error(learned, planted["none"], bounds)
