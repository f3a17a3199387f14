"""SplitLeadingTokens: an MLP rewritten as cat([mlp(x[:, :k]), mlp(x[:, k:])]) — exact in float on
every family, the leading copy with the plan's widths, its own encodings and the same weights,
chosen from calibration where the first token is outsized, and the other tokens' quantized error
lower for it."""

import copy

import pytest
import torch

from quantnpu.errors import PassFailedError, QuantNpuError
from quantnpu.graph.equivalence import sample_token_ids
from quantnpu.graph.meta import node_info, nodes_by_role
from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import FAMILIES, tiny_model
from quantnpu.passes import LeadingTokenSplit, PassManager, SplitLeadingTokens
from quantnpu.passes.round_weights import RoundWeightsGptq
from quantnpu.pipeline import STATIC, fake_quant_end, find_pass, float_passes, pipeline
from quantnpu.quantizers.bit_plan import BitPlan
from tests.graph_testing import annotated_graph, as_float64, assert_pass_diff, relative_max, run_passes

SEQ = 8


def test_split_graph_diff():
    """Both halves read one slice of the MLP input and the same weight parameters; the leading
    copy's linears carry the `@leading` role; the cat feeds what down_proj fed."""
    assert_pass_diff(annotated_graph("llama", layers=1), [SplitLeadingTokens(config=LeadingTokenSplit(mode="all"))], """
        -%linear_4: f32[1,8,128] = aten.linear(%mul_10, %model_model_layers_0_mlp_gate_proj_weight)  # role=layers.0.gate_proj
        -%silu: f32[1,8,128] = aten.silu(%linear_4)
        -%linear_5: f32[1,8,128] = aten.linear(%mul_10, %model_model_layers_0_mlp_up_proj_weight)  # role=layers.0.up_proj
        -%mul_11: f32[1,8,128] = aten.mul.Tensor(%silu, %linear_5)
        -%linear_6: f32[1,8,64] = aten.linear(%mul_11, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj
        -%add_8: f32[1,8,64] = aten.add.Tensor(%to_8, %linear_6)
        +%slice_tensor: f32[1,1,64] = aten.slice.Tensor(%mul_10, 1, 0, 1)
        +%slice_tensor_1: f32[1,7,64] = aten.slice.Tensor(%mul_10, 1, 1, 8)
        +%linear_default: f32[1,1,128] = aten.linear(%slice_tensor, %model_model_layers_0_mlp_gate_proj_weight)  # role=layers.0.gate_proj@leading
        +%silu_default: f32[1,1,128] = aten.silu(%linear_default)
        +%linear_default_1: f32[1,1,128] = aten.linear(%slice_tensor, %model_model_layers_0_mlp_up_proj_weight)  # role=layers.0.up_proj@leading
        +%mul_tensor: f32[1,1,128] = aten.mul.Tensor(%silu_default, %linear_default_1)
        +%linear_default_2: f32[1,1,64] = aten.linear(%mul_tensor, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj@leading
        +%linear_default_3: f32[1,7,128] = aten.linear(%slice_tensor_1, %model_model_layers_0_mlp_gate_proj_weight)  # role=layers.0.gate_proj
        +%silu_default_1: f32[1,7,128] = aten.silu(%linear_default_3)
        +%linear_default_4: f32[1,7,128] = aten.linear(%slice_tensor_1, %model_model_layers_0_mlp_up_proj_weight)  # role=layers.0.up_proj
        +%mul_tensor_1: f32[1,7,128] = aten.mul.Tensor(%silu_default_1, %linear_default_4)
        +%linear_default_5: f32[1,7,64] = aten.linear(%mul_tensor_1, %model_model_layers_0_mlp_down_proj_weight)  # role=layers.0.down_proj
        +%cat_default: f32[1,8,64] = aten.cat([%linear_default_2, %linear_default_5], 1)
        +%add_8: f32[1,8,64] = aten.add.Tensor(%to_8, %cat_default)
    """)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_keeps_the_function_on_every_family(family):
    gm = export_causal_lm(tiny_model(family, layers=2), SEQ).module()
    ids = sample_token_ids(gm, seed=5)
    exact = as_float64(gm)
    split = PassManager(float_passes("hadamard") + [SplitLeadingTokens(config=LeadingTokenSplit(mode="all", tokens=2))]).run(
        copy.deepcopy(exact))
    assert relative_max(split(ids), exact(ids)) < 1e-6
    leading = [r for r in nodes_by_role(split) if r.endswith("@leading")]
    assert {r.split(".")[1] for r in leading} == {"0", "1"} and any(r.endswith("down_proj@leading") for r in leading)


def _sink_model(channel: int = 5, factor: float = 30.0):
    """A tiny Llama whose first token (id 0, put first in every window) alone lights up one
    residual channel, which every MLP reads `factor` times harder than the others: the first
    position's MLP tensors are far larger than the rest's, as with a real attention sink."""
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding[:, channel] = 0.0
        embedding[0] = 0.0
        embedding[0, channel] = 10.0
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:, channel] *= factor
            layer.mlp.up_proj.weight[:, channel] *= factor
    return model


def _windows(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    windows = []
    for _ in range(count):
        ids = torch.randint(1, 128, (1, SEQ), generator=generator)
        ids[0, 0] = 0
        windows.append(ids)
    return windows


def test_auto_splits_the_outsized_first_token_and_lowers_the_other_tokens_error():
    gm = export_causal_lm(_sink_model(), SEQ).module()
    calibration, evaluation = _windows(4, 1), _windows(4, 2)
    errors = {}
    for mode in ("off", "auto"):
        passes = pipeline("8-8-8", calibration, STATIC, rotate="none", leading_split=LeadingTokenSplit(mode=mode))
        fq = PassManager(passes, stop_after=fake_quant_end(passes)).run(copy.deepcopy(gm))
        with torch.no_grad():
            quantized, reference = torch.cat([fq(w)[0] for w in evaluation]), torch.cat([gm(w)[0] for w in evaluation])
        # the tokens after the first: their logits' error relative to their own size
        errors[mode] = ((quantized[:, 1:] - reference[:, 1:]).norm() / reference[:, 1:].norm()).item()
        if mode == "auto":
            split = find_pass(passes, SplitLeadingTokens)
            assert any(s.split for s in split.layers)   # which ones: test_auto_splits_where_the_ratio_recomputed_here_is_at_least_the_threshold
            assert "split" in split.report()
    print("other tokens' relative logit error, off vs auto:", errors)
    assert errors["auto"] < 0.7 * errors["off"], errors


def test_auto_splits_where_the_ratio_recomputed_here_is_at_least_the_threshold():
    """Each MLP's ratio (largest |value| of its gate/up/down outputs, activation and product on the
    first token over that on the others, across the calibration windows) recomputed from the float
    graph's values: the pass reports it and splits exactly the MLPs where it reaches the 2.0
    threshold. The sink model has one of each: layer 0 (measured 11.6) and layer 1 (0.47)."""
    gm = PassManager(float_passes("none")).run(export_causal_lm(_sink_model(), SEQ).module())
    calibration = _windows(2, 1)
    roles = nodes_by_role(gm)
    tensors = {}
    for layer in range(2):
        gate, up, down = (roles[f"layers.{layer}.{k}"] for k in ("gate_proj", "up_proj", "down_proj"))
        product = down.args[0]
        activation = next(a for a in product.args if a is not up)
        tensors.update({node: layer for node in (gate, activation, up, product, down)})
    head, rest = dict.fromkeys(tensors, 0.0), dict.fromkeys(tensors, 0.0)

    class Ranges(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node in tensors:
                head[node] = max(head[node], float(value[:, :1].abs().max()))
                rest[node] = max(rest[node], float(value[:, 1:].abs().max()))
            return value

    with torch.no_grad():
        for window in calibration:
            Ranges(gm).run(window)
    ratios = {layer: max(head[n] / rest[n] for n, owner in tensors.items() if owner == layer) for layer in range(2)}
    split = SplitLeadingTokens(calibration, LeadingTokenSplit(mode="auto"))
    run_passes(copy.deepcopy(gm), [split])
    assert [s.layer for s in split.layers] == [0, 1]
    for s in split.layers:
        assert s.ratio == pytest.approx(ratios[s.layer], rel=1e-6) and s.split == (ratios[s.layer] >= 2.0), (s, ratios)
    assert [s.split for s in split.layers] == [True, False]


def test_auto_keeps_mlps_below_the_threshold():
    gm = export_causal_lm(_sink_model(), SEQ).module()
    split = SplitLeadingTokens(_windows(2, 1), LeadingTokenSplit(mode="auto", threshold=1e9))
    out = run_passes(copy.deepcopy(gm), float_passes("none") + [split])
    assert split.layers and not any(s.split for s in split.layers)
    assert not any(r.endswith("@leading") for r in nodes_by_role(out))


def test_leading_copy_follows_the_plan_with_its_own_encodings_and_shares_the_weight():
    gm = export_causal_lm(_sink_model(), SEQ).module()
    calibration = _windows(3, 1)
    plan = BitPlan.parse("4-8-8", ["layers.1.up_proj@leading.input=16"])
    passes = pipeline(plan, calibration, STATIC, leading_split=LeadingTokenSplit(mode="all"), weight_rounding="gptq")
    fq = PassManager(passes, stop_after=fake_quant_end(passes)).run(copy.deepcopy(gm))
    roles = nodes_by_role(fq)
    # gate_proj reads 16 bits in both (its output is 16-bit: HTP legalization); an override can name the copy alone
    for role, bits in (("layers.0.gate_proj", 16), ("layers.0.up_proj", 8), ("layers.0.down_proj", 8), ("layers.1.up_proj", 8)):
        leading, rest = roles[f"{role}@leading"], roles[role]
        assert leading.args[1].args[0].target == rest.args[1].args[0].target  # one weight parameter
        weight = {fq.get_submodule(n.args[1].target).encoding for n in (leading, rest)}
        assert len(weight) == 1 and next(iter(weight)).bits == 4
        reads = {name: fq.get_submodule(n.args[0].target).encoding for name, n in (("leading", leading), ("rest", rest))}
        expected = 16 if role == "layers.1.up_proj" else bits
        assert (reads["leading"].bits, reads["rest"].bits) == (expected, bits), role
    # the leading token's range is its own: far wider than the rest's where the sink is planted
    down = {name: fq.get_submodule(roles[f"layers.0.down_proj{tag}"].args[0].target).encoding for name, tag in (("leading", "@leading"), ("rest", ""))}
    assert max(down["leading"].scale) > 4 * max(down["rest"].scale)
    gptq = find_pass(passes, RoundWeightsGptq)
    assert len(gptq.layers) == len({r.parameter for r in gptq.layers}) == 14  # each shared weight rounded once


def test_split_errors_name_the_problem():
    with pytest.raises(QuantNpuError, match="choose one of off, auto, all"):
        LeadingTokenSplit(mode="some")
    with pytest.raises(QuantNpuError, match="at least 1 token"):
        LeadingTokenSplit(tokens=0)
    gm = annotated_graph("llama", layers=1)
    with pytest.raises(PassFailedError, match="cannot split 8 leading tokens off a sequence of 8"):
        run_passes(gm, [SplitLeadingTokens(config=LeadingTokenSplit(mode="all", tokens=8))])
    with pytest.raises(PassFailedError, match="needs calibration batches"):
        run_passes(annotated_graph("llama", layers=1), [SplitLeadingTokens(config=LeadingTokenSplit(mode="auto"))])


def test_mlp_reading_another_activation_is_refused():
    gm = annotated_graph("llama", layers=1)
    roles = nodes_by_role(gm)
    up, down = roles["layers.0.up_proj"], roles["layers.0.down_proj"]
    product = down.args[0]
    attention_out = roles["layers.0.o_proj"]
    with gm.graph.inserting_after(product):
        # the product scaled per token by a sum over the attention output: not the MLP's own input
        total = gm.graph.call_function(torch.ops.aten.sum.dim_IntList, (attention_out, [-1], True))
        mixed = gm.graph.call_function(torch.ops.aten.mul.Tensor, (product, total))
    total.meta["val"] = attention_out.meta["val"].sum(-1, keepdim=True)
    mixed.meta["val"] = product.meta["val"]
    down.replace_input_with(product, mixed)
    gm.recompile()
    assert node_info(up).kind == "up_proj"
    with pytest.raises(PassFailedError, match="neither its input nor a constant"):
        PassManager([SplitLeadingTokens(config=LeadingTokenSplit(mode="all"))], verify=False).run(gm)


def test_with_the_split_smoothing_and_promotion_statistics_leave_the_leading_tokens_out():
    from quantnpu.passes import AssignBitWidths, SmoothingConfig, SmoothUnrotatedInputs

    calibration = _windows(2, 1)
    passes = pipeline("8-8-8", calibration, STATIC, rotate="none", promote_fraction=0.5, smoothing=SmoothingConfig(mode="fixed"),
                      leading_split=LeadingTokenSplit(mode="auto", tokens=1))
    assert find_pass(passes, SmoothUnrotatedInputs).config.skip_leading == 1 and find_pass(passes, AssignBitWidths).skip_leading == 1
    # on the planted sink, the down_proj factors (max|X_j|^a / max|W_j|^(1-a)) no longer see it
    gm = export_causal_lm(_sink_model(), SEQ).module()
    factors = {}
    for skip in (0, 1):
        smoothing = SmoothUnrotatedInputs(calibration, SmoothingConfig(mode="fixed", skip_leading=skip))
        run_passes(copy.deepcopy(gm), float_passes("none") + [smoothing])
        factors[skip] = next(s.factors for s in smoothing.layers if s.role == "layers.0.down_proj")
    assert float(factors[1].max()) < 0.5 * float(factors[0].max())
