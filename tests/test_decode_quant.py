"""One pipeline run, one set of encodings (quantnpu.passes.decode_quant): the prefill and decode Q/DQ
graphs of a fake-quant decoder, and their `.pte` with `prefill` and `decode` methods on the HTP
simulator (quantnpu.lowering.cached). Tiny models only."""

import warnings

import pytest
import torch

from quantnpu.errors import GraphStructureError
from quantnpu.graph.decode import KvCacheRunner
from quantnpu.passes.decode_quant import _compare, convert_cached
from quantnpu.graph.equivalence import sample_token_ids
from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import tiny_model
from quantnpu.passes import PassManager
from quantnpu.passes.split_leading_tokens import LeadingTokenSplit
from quantnpu.pipeline import STATIC, fake_quant_end, pipeline
from quantnpu.quantizers.encodings import Encoding

SEQ = 12
PREFILL = 8


def _fake_quant(family: str, recipe=STATIC):
    """The pipeline's fake-quant graph (8-8-8 static) and the passes that finish it."""
    gm = export_causal_lm(tiny_model(family, layers=2), SEQ).module()
    passes = pipeline("8-8-8", [sample_token_ids(gm, seed) for seed in range(2)], recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # R1 skipped on the Gemmas: not what this file tests
        fake_quant = PassManager(passes, stop_after=fake_quant_end(passes)).run(gm)
    return fake_quant, passes


def _converted_full(fake_quant, passes):
    return PassManager(passes, verify=False).run(fake_quant, start_after=fake_quant_end(passes))


def _cached_logits(pair, ids, prompt):
    runner = KvCacheRunner(pair.prefill, pair.decode)
    pieces = [runner.prefill(ids[:, :prompt])]
    for t in range(prompt, ids.shape[1]):
        pieces.append(runner.step(ids[:, t:t + 1]))
    return torch.cat(pieces, 1)


def _steps(a, b, encoding: Encoding) -> float:
    return ((a - b).abs() / encoding.scale[0]).max().item()


def _quantize_ops(gm, placeholder: str):
    node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == placeholder)
    (quantize,) = node.users
    return float(quantize.args[1]), int(quantize.args[2]), quantize.args[-1]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_qdq_prefill_and_decode_compute_the_full_sequence_qdq_logits(family):
    """Converted with the fake-quant graph's encodings (nothing calibrated again): Q/DQ prefill of a
    4-token prompt then 8 decode steps give the converted full-sequence graph's logits within a
    step of the logits' grid (float32 accumulation order), the same argmax everywhere."""
    fake_quant, passes = _fake_quant(family)
    pair = convert_cached(fake_quant, PREFILL, SEQ - 1)
    full = _converted_full(fake_quant, passes)
    ids = sample_token_ids(full, seed=5)
    reference = full(ids)
    cached = _cached_logits(pair, ids, prompt=4)
    steps = _steps(cached, reference, pair.logits_encoding)
    print(f"{family}: Q/DQ prefill + decode vs full sequence: max {steps:.2f} logit steps")
    assert steps <= 2
    assert torch.equal(cached.argmax(-1), reference.argmax(-1))
    # the cache at the plan's KV bits, one encoding on both sides of the boundary
    assert [e.bits for e in pair.k_encodings + pair.v_encodings] == [8] * 4
    assert pair.checked["prefill"] > 50 and pair.checked["decode"] > 50
    for layer, (k, v) in enumerate(zip(pair.k_encodings, pair.v_encodings)):
        for name, encoding in ((f"k_cache_{layer}", k), (f"v_cache_{layer}", v)):
            scale, zero_point, dtype = _quantize_ops(pair.decode.module, name)
            assert dtype == torch.uint8 and zero_point == 128 and scale == pytest.approx(encoding.scale[0], rel=1e-7)
    assert pair.mask_encoding is not None and pair.mask_encoding.bits == 16
    table = pair.encodings  # the encodings JSON's content: both graphs, the cache and mask inputs included
    assert all(name in table.activations for name in ("attention_mask", "k_cache_0", "v_cache_1"))


def test_the_leading_token_split_runs_in_the_prefill_only():
    """SplitLeadingTokens (all MLPs, 1 token): the prefill has the @leading copies, the decode graph
    none; every position after the first uses the rest's encodings, so Q/DQ prefill + decode equal
    the converted split graph's logits."""
    fake_quant, passes = _fake_quant("llama", STATIC.replace(leading_split=LeadingTokenSplit(mode="all")))
    pair = convert_cached(fake_quant, PREFILL, SEQ - 1)
    assert pair.leading_tokens == 1
    roles = {kind: {str(n.meta.get("quantnpu", "")) for n in graph.module.graph.nodes}
             for kind, graph in (("prefill", pair.prefill), ("decode", pair.decode))}
    assert any("@leading" in r for r in roles["prefill"]) and not any("@leading" in r for r in roles["decode"])
    full = _converted_full(fake_quant, passes)
    ids = sample_token_ids(full, seed=6)
    reference = full(ids)
    for prompt in (1, 5):
        cached = _cached_logits(pair, ids, prompt)
        steps = _steps(cached, reference, pair.logits_encoding)
        print(f"split, prompt {prompt}: max {steps:.2f} logit steps")
        assert steps <= 2 and torch.equal(cached.argmax(-1), reference.argmax(-1))


def test_without_the_split_the_rest_copy_still_reads_its_own_input_encoding():
    """Stage two calibrates the rest slice `x[:, k:]` apart from `x` (its own encoding: on SmolLM2's
    shipped run a 16-bit scale 0.2% off the norm's). The decode graph keeps that node as the one-piece
    `cat([x])` with the same record, so the rest copy reads the same integers in both graphs (reading
    `x` directly, the decode graph computed another function and the cross-check refused it)."""
    from quantnpu.graph.decode import unsplit_leading_tokens
    from quantnpu.graph.meta import tensor_quant

    fake_quant, _ = _fake_quant("llama", STATIC.replace(leading_split=LeadingTokenSplit(mode="all")))
    unsplit = {n.name: n for n in unsplit_leading_tokens(fake_quant).graph.nodes}
    rest = [n for n in fake_quant.graph.nodes if n.target == torch.ops.aten.slice.Tensor and n.name in unsplit
            and unsplit[n.name].target == torch.ops.aten.cat.default]
    assert len(rest) == 2  # one rest slice per split MLP, the only slices that change
    for node in rest:
        assert tensor_quant(node) is not None and tensor_quant(unsplit[node.name]) == tensor_quant(node)


def test_a_tensor_without_a_counterpart_or_with_another_encoding_is_an_error_naming_it():
    eight, sixteen = Encoding(8, (0.1,)), Encoding(16, (0.001,))
    with pytest.raises(GraphStructureError, match="node %add_3: quantized in the decode graph but has no counterpart"):
        _compare({"linear": {eight}}, {"linear": {eight}, "add_3": {sixteen}}, set())
    with pytest.raises(GraphStructureError, match="node %mul_2: quantized in the prefill graph but has no counterpart"):
        _compare({"linear": {eight}, "mul_2": {eight}}, {"linear": {eight}}, set())
    with pytest.raises(GraphStructureError, match="node %linear: quantized at .* in the prefill graph and at"):
        _compare({"linear": {eight}}, {"linear": {sixteen}}, set())
    _compare({"linear": {eight}, "lead_mlp": {sixteen}}, {"linear": {eight}}, {"lead_mlp"})  # prefill-only: fine
    # a shared tensor's extra encoding on an edge into a leading copy only (its 16-bit input): fine,
    # kept apart; the same encoding on a tensor both graphs read is a mismatch
    _compare({"norm": {eight}}, {"norm": {eight}}, {"lead_gate"}, prefill_leading={"norm": {sixteen}})
    with pytest.raises(GraphStructureError, match="in the prefill graph and at"):
        _compare({"norm": {eight, sixteen}}, {"norm": {eight}}, {"lead_gate"})


def test_a_fake_quant_tensor_without_an_encoding_is_an_error_naming_it():
    from quantnpu.graph.meta import QUANT_KEY

    fake_quant, _ = _fake_quant("llama")
    norm = next(n for n in fake_quant.graph.nodes if n.target == torch.ops.aten.rms_norm.default)
    del norm.meta[QUANT_KEY]
    with pytest.raises(GraphStructureError, match=f"node %{norm.name}: quantized tensor has no encoding"):
        convert_cached(fake_quant, PREFILL, SEQ - 1)


# ---- the .pte on the HTP simulator ------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "gemma2"])
def lowered(request, tmp_path_factory):
    from quantnpu.lowering.cached import lower_cached_to_qnn

    fake_quant, passes = _fake_quant(request.param)
    pair = convert_cached(fake_quant, PREFILL, SEQ - 1)
    result = lower_cached_to_qnn(pair, tmp_path_factory.mktemp("kv") / f"{request.param}.pte", eos_ids=(2,))
    return request.param, fake_quant, passes, pair, result


def test_one_pte_with_a_prefill_and_a_decode_method(lowered):
    """One delegate per method and nothing else on the CPU; the cache and the mask cross as
    integers at their encodings; the metadata is readable from the program."""
    from quantnpu.runtime_harness.pte import CachedPte

    _, _, _, pair, result = lowered
    assert result.delegates == {"prefill": 1, "decode": 1}
    assert result.outside_delegates == {"prefill": [], "decode": []}
    assert len(result.quantized_io["prefill"]) == 4 and all(" uint8[" in t for t in result.quantized_io["prefill"])
    decode_io = result.quantized_io["decode"]
    assert sum(t.startswith(("k_cache_", "v_cache_")) and " uint8[" in t for t in decode_io) == 4
    assert any(t.startswith("attention_mask uint16[") for t in decode_io)
    program = CachedPte(result.pte_path)
    assert {"prefill", "decode", "get_cache_slots", "get_prefill_tokens"} <= set(program.program.method_names)
    meta = program.meta
    assert (meta["prefill_tokens"], meta["cache_slots"], meta["layers"], meta["vocab_size"]) == (PREFILL, SEQ - 1, 2, 128)
    assert meta["eos_ids"] == [2] and meta["leading_tokens"] == 0
    assert [e["scale"] for e in meta["k_cache"]] == [e.scale[0] for e in pair.k_encodings]
    assert program.program.load_method("get_cache_slots").execute([])[0] == SEQ - 1


def test_pte_prefill_and_decode_agree_with_the_qdq_graphs(lowered):
    """On the simulator, against the Q/DQ graphs run by the same cache bookkeeping, the K/V the .pte
    wrote read back into the Q/DQ decode graph at each step (so both decode from the same integers).
    Measured: Llama 171 / 240 steps of the 16-bit logits grid (prefill / decode; 0.6% / 1.0% of the
    largest logit), K/V within 1-2 codes; the single-method `ids -> logits` program of the same
    tiny Llama is 268 steps (1.2%) from its Q/DQ graph, so the two-method program is no worse.
    Gemma-2: 1316 / 1544 steps (4.0% / 6.1%), K/V within 3 codes (its single-method distance was not
    measured here). HTP's requantization rounds differently from the reference; on these random
    tiny models a step in an 8-bit tensor moves the 16-bit logits by many of their fine steps."""
    from quantnpu.runtime_harness.pte import CachedPte, from_codes, to_codes

    family, _, _, pair, result = lowered
    program, reference = CachedPte(result.pte_path), KvCacheRunner(pair.prefill, pair.decode)
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(5))
    logits = pair.logits_encoding
    device, expected = program.prefill(ids[:, :4]), reference.prefill(ids[:, :4])
    worst = {"prefill": _steps(device, expected, logits), "decode": 0.0}
    relative = {"prefill": ((device - expected).abs().max() / expected.abs().max()).item(), "decode": 0.0}
    meta = program.meta
    codes = [(to_codes(r, e, c.dtype).int() - c.int())[:, :, :4].abs().max().item()
             for c, r, e in zip(program.k + program.v, reference.k + reference.v, meta["k_cache"] + meta["v_cache"])]
    for t in range(4, SEQ):
        # the .pte's cache read back into the Q/DQ decode graph: same inputs for both
        for r, c, e in zip(reference.k + reference.v, program.k + program.v, meta["k_cache"] + meta["v_cache"]):
            r.copy_(from_codes(c, e))
        device, expected = program.step(ids[:, t:t + 1]), reference.step(ids[:, t:t + 1])
        worst["decode"] = max(worst["decode"], _steps(device, expected, logits))
        relative["decode"] = max(relative["decode"], ((device - expected).abs().max() / expected.abs().max()).item())
    print(f"{family}: .pte vs Q/DQ, max logit steps {worst}, relative {relative}, prefill K/V codes {codes}")
    assert max(codes) <= 3
    assert max(relative.values()) < (0.03 if family == "llama" else 0.1)
