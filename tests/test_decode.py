"""Two graphs from one decoder (quantnpu.graph.decode): a prefill writing the KV cache and a decode
step reading it, derived by rewriting the recognized full-sequence graph. In float they compute the
full-sequence graph's logits at every position, for every supported family and every graph form
the pipeline has before quantization; what the rewrite does not understand is an error naming
the node."""

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantnpu.errors import GraphStructureError
from quantnpu.graph.decode import KvCacheRunner, derive_decode, derive_prefill
from quantnpu.graph.equivalence import as_float64, sample_token_ids
from quantnpu.graph.ops import insert_call
from quantnpu.graph.text import graph_text
from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import FAMILIES, tiny_model
from quantnpu.passes import AnnotateRoles, Canonicalize, FoldConstants, PassManager, PrepareForQnn
from quantnpu.pipeline import float_passes
from tests.graph_testing import relative_max

aten = torch.ops.aten
SEQ = 12


def _front(family: str, seq_len: int = SEQ, use_cache=False, passes=None, float64: bool = True, layers: int = 2,
           batch: int = 1, **shape):
    """A tiny family's exported graph after the recognizing passes (or `passes`), in float64."""
    gm = export_causal_lm(tiny_model(family, layers=layers, **shape), seq_len, batch, use_cache=use_cache).module()
    if float64:
        gm = as_float64(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # R1 skipped on the Gemmas: not what this file tests
        return PassManager(passes if passes is not None else [Canonicalize(), FoldConstants(), AnnotateRoles()]).run(gm)


def _cached_logits(gm, ids: torch.Tensor, prompt: int, prefill_tokens: int, cache_slots: int, chunk: int = 1):
    """Prefill the first `prompt` tokens (padded to `prefill_tokens`), then the rest `chunk` at a time."""
    runner = KvCacheRunner(derive_prefill(gm, prefill_tokens), derive_decode(gm, cache_slots, chunk))
    pieces = [runner.prefill(ids[:, :prompt])]
    for start in range(prompt, ids.shape[1], chunk):
        pieces.append(runner.step(ids[:, start:start + chunk]))
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_gives_the_full_sequence_logits(family):
    gm = _front(family)
    ids = sample_token_ids(gm, seed=1)
    full = gm(ids)
    # a prompt shorter than the prefill (3 of 8: padded), then 9 decode steps into a cache of 11
    # slots that fills as it goes; the last step attends to a full cache
    short = _cached_logits(gm, ids, prompt=3, prefill_tokens=8, cache_slots=SEQ - 1)
    # a prompt that fills the prefill exactly
    exact = _cached_logits(gm, ids, prompt=8, prefill_tokens=8, cache_slots=SEQ - 1)
    print(f"{family}: max relative difference {relative_max(short, full):.2e} (3-token prompt), "
          f"{relative_max(exact, full):.2e} (8-token prompt)")
    assert relative_max(short, full) < 1e-5
    assert relative_max(exact, full) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2", "et-llama"])
def test_decode_in_chunks_and_after_a_one_token_prompt(family):
    gm = _front(family)
    ids = sample_token_ids(gm, seed=2)
    full = gm(ids)
    chunks = _cached_logits(gm, ids, prompt=4, prefill_tokens=4, cache_slots=SEQ - 2, chunk=2)  # chunked prefill
    single = _cached_logits(gm, ids, prompt=1, prefill_tokens=6, cache_slots=SEQ - 1)
    assert relative_max(chunks, full) < 1e-5
    assert relative_max(single, full) < 1e-5


@pytest.mark.parametrize("form", ["default-export", "rotated", "prepared-for-qnn"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "et-llama"])
def test_every_graph_form_before_quantization(family, form):
    """The user's default export (cache artefacts), the graph after R1/R2 are fused and baked, and
    the graph QNN's quantizer annotates (SDPA decomposed, the attention scale split over q and k,
    the mask a where with -255): the same rewrite, the same logits."""
    passes = {"default-export": None, "rotated": float_passes("hadamard"),
              "prepared-for-qnn": float_passes("hadamard") + [PrepareForQnn()]}[form]
    gm = _front(family, use_cache=None if form == "default-export" else False, passes=passes)
    ids = sample_token_ids(gm, seed=3)
    cached = _cached_logits(gm, ids, prompt=5, prefill_tokens=8, cache_slots=SEQ - 1)
    assert relative_max(cached, gm(ids)) < 1e-5
    decode = derive_decode(gm, SEQ - 1)
    assert decode.mask_value == (-255.0 if form == "prepared-for-qnn" else decode.mask_value)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 12, 16]),
    seq_len=st.integers(5, 13),
    data=st.data(),
)
def test_any_attention_shape_and_length(kv_heads, group, head_dim, seq_len, data):
    """Multi-head (group 1), grouped and multi-query attention, head dims and lengths that are not
    powers of two (and may equal each other), any prompt length and chunk."""
    heads = kv_heads * group
    gm = _front("llama", seq_len=seq_len, layers=1, hidden=heads * head_dim, heads=heads, kv_heads=kv_heads)
    prefill_tokens = data.draw(st.integers(1, seq_len - 1), label="prefill_tokens")
    prompt = data.draw(st.integers(1, prefill_tokens), label="prompt")
    chunk = data.draw(st.integers(1, seq_len - prompt), label="chunk")
    ids = sample_token_ids(gm, seed=seq_len)
    length = prompt + (seq_len - prompt) // chunk * chunk  # whole chunks only
    cached = _cached_logits(gm, ids[:, :length], prompt, prefill_tokens, cache_slots=seq_len - chunk, chunk=chunk)
    assert relative_max(cached, gm(ids)[:, :length]) < 1e-5


def test_a_batch_of_two():
    gm = _front("qwen3", batch=2)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(7))
    cached = _cached_logits(gm, ids, prompt=4, prefill_tokens=8, cache_slots=SEQ - 1)
    assert cached.shape == (2, SEQ, 128)
    assert relative_max(cached, gm(ids)) < 1e-5


def test_causal_attention_without_a_mask():
    """SDPA with is_causal=True and no mask (how some exports write it): the prefill keeps it, the
    decode step gets the mask input in its place."""
    gm = _front("llama")
    ids = sample_token_ids(gm, seed=8)
    full = gm(ids)
    for node in gm.graph.nodes:
        if node.target == aten.scaled_dot_product_attention.default:
            node.args = node.args[:3]
            node.kwargs = {**node.kwargs, "is_causal": True}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert relative_max(gm(ids), full) < 1e-12
    decode = derive_decode(gm, SEQ - 1)
    assert decode.mask_shape == (1, 1, 1, SEQ) and decode.mask_value == float("-inf")
    assert relative_max(_cached_logits(gm, ids, prompt=3, prefill_tokens=8, cache_slots=SEQ - 1), full) < 1e-5


def test_the_derived_graphs_export_and_load_as_programs(tmp_path):
    """What lowering will take: both graphs go through torch.export and a .pt2 round trip, and a
    graph loaded from a user's .pt2 derives the same way."""
    from quantnpu.models.export import load_pt2, save_pt2

    model = tiny_model("mistral", layers=2)
    save_pt2(export_causal_lm(model, SEQ), tmp_path / "model.pt2")
    gm = PassManager([Canonicalize(), FoldConstants(), AnnotateRoles()]).run(load_pt2(tmp_path / "model.pt2").module())
    prefill, decode = derive_prefill(gm, 8), derive_decode(gm, SEQ - 1)
    runner = KvCacheRunner(prefill, decode)
    runner.prefill(torch.tensor([[1, 2, 3]]))
    inputs = (torch.tensor([[4]]), torch.tensor([3]), runner.mask(), *runner.k, *runner.v)
    program = torch.export.export(decode.module, inputs)
    save_pt2(program, tmp_path / "decode.pt2")
    loaded = load_pt2(tmp_path / "decode.pt2")
    assert [s.arg.name for s in loaded.graph_signature.input_specs if s.kind.name == "USER_INPUT"] == [
        "input_ids", "input_pos", "attention_mask", "k_cache_0", "k_cache_1", "v_cache_0", "v_cache_1"]
    for ours, theirs in zip(decode(*inputs), loaded.module()(*inputs)):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    torch.export.export(prefill.module, (torch.zeros(1, 8, dtype=torch.int64),))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_fake_quant_graph_before_conversion(family):
    """Under stage two's fixed observers (8-8-8, static encodings): the derived graphs share the
    observer modules (one set of encodings by construction), the cache holds the observed K/V, and
    prefill + decode compute the fake-quant function at every position up to float32 rounding of
    the different accumulation orders (a grid step here and there)."""
    from quantnpu.passes.insert_observers import observed_tensors
    from quantnpu.pipeline import STATIC, fake_quant_end, pipeline

    gm = export_causal_lm(tiny_model(family, layers=2), SEQ).module()
    passes = pipeline("8-8-8", [sample_token_ids(gm, seed) for seed in range(2)], STATIC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = PassManager(passes, stop_after=fake_quant_end(passes))
        fake_quant = manager.run(gm)
    ids = sample_token_ids(fake_quant, seed=5)
    full = fake_quant(ids)
    prefill, decode = derive_prefill(fake_quant, 8), derive_decode(fake_quant, SEQ - 1)
    cached = _cached_logits(fake_quant, ids, prompt=4, prefill_tokens=8, cache_slots=SEQ - 1)
    print(f"{family} fake-quant: max relative difference {relative_max(cached, full):.2e}")
    assert relative_max(cached, full) < 1e-4
    assert torch.equal(cached.argmax(-1), full.argmax(-1))
    observers = {id(group.module) for group in observed_tensors(fake_quant).values()}
    for graph in (prefill, decode):
        used = {id(group.module) for group in observed_tensors(graph.module).values()}
        assert used and used <= observers
        assert all(name.startswith("activation_post_process") for pair in graph.cached for name in pair)
    converted = PassManager(passes, verify=False).run(fake_quant, start_after=fake_quant_end(passes))
    with pytest.raises(GraphStructureError, match="a converted Q/DQ graph: derive the prefill and decode graphs from "
                                                  "the graph before conversion"):
        derive_decode(converted, 4)


def test_float32_graphs_agree_within_float32_rounding():
    gm = _front("llama", float64=False)
    ids = sample_token_ids(gm, seed=4)
    cached = _cached_logits(gm, ids, prompt=5, prefill_tokens=8, cache_slots=SEQ - 1)
    assert cached.dtype == torch.float32
    assert relative_max(cached, gm(ids)) < 1e-5


def test_token_count_equal_to_head_dim():
    """16 tokens and head_dim 16: the token axis is found by propagation, not by its size."""
    gm = _front("llama", seq_len=16)
    ids = sample_token_ids(gm, seed=5)
    cached = _cached_logits(gm, ids, prompt=10, prefill_tokens=16, cache_slots=15)  # P = head_dim = 16
    assert relative_max(cached, gm(ids)) < 1e-5
    gm = _front("et-llama", seq_len=16)  # RoPE in [B, T, H, D] layout, tables [T, 1, D]
    cached = _cached_logits(gm, ids, prompt=7, prefill_tokens=16, cache_slots=15)
    assert relative_max(cached, gm(ids)) < 1e-5


def test_prefill_of_the_whole_sequence_is_the_source_graph_plus_the_cache():
    gm = _front("qwen2", float64=False)
    ids = sample_token_ids(gm, seed=6)
    prefill = derive_prefill(gm)
    logits, *kv = prefill(ids)
    assert torch.equal(logits, gm(ids))
    assert [tuple(t.shape) for t in kv] == [(1, 2, SEQ, 16)] * 4 and prefill.layers == 2
    # weights shared with the source, not copied
    source = dict(gm.named_parameters())
    for graph in (prefill, derive_decode(gm, 4)):
        for name, parameter in graph.module.named_parameters():
            assert parameter is source[name]


def test_the_decode_graph_reads_the_cache():
    """What the rewrite does to one layer of a tiny Llama (12 tokens -> 1 token after 7 cache slots):
    new inputs, the RoPE tables gathered at input_pos, the cache concatenated in front of the new K
    (after RoPE) and V, before the grouped-query repeat, sizes rewritten on the token axes only
    (16 is head_dim, kept), the mask an input, the new K/V returned."""
    gm = _front("llama", float64=False, layers=1)
    decode = derive_decode(gm, cache_slots=7)
    keep = {aten.index_select.default, aten.cat.default, aten.view.default, aten.reshape.default,
            aten.expand.default, aten.scaled_dot_product_attention.default}
    text = graph_text(decode.module, lambda n: n.op in ("placeholder", "output") or n.target in keep)
    print(text)
    assert text == """\
%input_ids: i64[1,1] = placeholder
%input_pos: i64[1] = placeholder
%attention_mask: f32[1,1,1,8] = placeholder
%k_cache_0: f32[1,2,7,16] = placeholder
%v_cache_0: f32[1,2,7,16] = placeholder
%view: f32[1,1,4,16] = aten.view(%linear, [1, 1, -1, 16])
%view_1: f32[1,1,2,16] = aten.view(%linear_1, [1, 1, -1, 16])
%view_2: f32[1,1,2,16] = aten.view(%linear_2, [1, 1, -1, 16])
%cat_default_1: f32[1,2,8,16] = aten.cat([%v_cache_0, %transpose_2], 2)
%index_select_default: f32[1,1,1,16] = aten.index_select(%_positions__folded_unsqueeze_14, 2, %input_pos)
%index_select_default_1: f32[1,1,1,16] = aten.index_select(%_positions__folded_unsqueeze_15, 2, %input_pos)
%cat_1: f32[1,4,1,16] = aten.cat([%neg, %slice_2], -1)
%cat_2: f32[1,2,1,16] = aten.cat([%neg_1, %slice_4], -1)
%cat_default: f32[1,2,8,16] = aten.cat([%k_cache_0, %add_5], 2)
%expand_2: f32[1,2,2,8,16] = aten.expand(%unsqueeze_16, [1, 2, 2, 8, 16])
%reshape: f32[1,4,8,16] = aten.reshape(%expand_2, [1, 4, 8, 16])
%expand_3: f32[1,2,2,8,16] = aten.expand(%unsqueeze_17, [1, 2, 2, 8, 16])
%reshape_1: f32[1,4,8,16] = aten.reshape(%expand_3, [1, 4, 8, 16])
%scaled_dot_product_attention: f32[1,4,1,16] = aten.scaled_dot_product_attention(%add_4, %reshape, %reshape_1, %attention_mask, scale=0.25)  # role=layers.0.attention
%reshape_2: f32[1,4,1,16] = aten.reshape(%scaled_dot_product_attention, [1, -1, 1, 16])
%reshape_3: f32[1,1,64] = aten.reshape(%transpose_3, [1, 1, -1])
return (%linear_7, %add_5, %transpose_2)"""
    assert decode.cached == (("add_5", "transpose_2"),)
    assert decode.mask_value == float("-inf")  # the source mask is boolean


def test_runner_masks_the_slots_not_written():
    gm = _front("llama", float64=False)
    runner = KvCacheRunner(derive_prefill(gm, 4), derive_decode(gm, 8))
    runner.prefill(torch.tensor([[5, 6, 7]]))
    mask = runner.mask()
    assert mask.shape == (1, 1, 1, 9)
    assert mask[0, 0, 0].tolist() == [0.0] * 3 + [float("-inf")] * 5 + [0.0]
    assert runner.k[0][:, :, 3:].abs().max() == 0  # the padding's K/V were not written


# ---- what the rewrite refuses ------------------------------------------------------------------

def _insert_after_embedding(gm, target, *args):
    embedding = next(n for n in gm.graph.nodes if n.target == aten.embedding.default)
    user = next(iter(embedding.users))
    with gm.graph.inserting_after(embedding):
        node = insert_call(gm.graph, user, target, embedding, *args)
    embedding.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
    gm.recompile()
    return node


@pytest.mark.parametrize("target, args, message", [
    (aten.cumsum.default, (1,), "aten.cumsum.default on token-carrying values is not understood"),
    (aten.flip.default, ([1],), "aten.flip.default on token-carrying values is not understood"),
    (aten.slice.Tensor, (1, 0, SEQ, 1), None),  # a whole slice of the tokens is fine
])
def test_an_op_across_tokens_is_refused_naming_it(target, args, message):
    gm = _front("llama", float64=False)
    node = _insert_after_embedding(gm, target, *args)
    if message is None:
        derive_decode(gm, 4)
        return
    with pytest.raises(GraphStructureError, match=f"node %{node.name}: {message}"):
        derive_decode(gm, 4)


def test_a_slice_of_the_tokens_is_refused_naming_it():
    """A slice of the token axis other than SplitLeadingTokens' leading/rest split (here a slice of
    the rest) has no decode form."""
    gm = _front("llama", float64=False)
    node = _insert_after_embedding(gm, aten.slice.Tensor, 1, 1, SEQ)
    pad = insert_call(gm.graph, next(iter(node.users)), aten.cat.default, [insert_call(
        gm.graph, next(iter(node.users)), aten.slice.Tensor, node, 1, 0, 1), node], 1)
    node.replace_all_uses_with(pad, delete_user_cb=lambda u: u not in (pad,) and u.target != aten.slice.Tensor)
    gm.recompile()
    inner = next(u for u in node.users if u.target == aten.slice.Tensor)
    with pytest.raises(GraphStructureError, match=f"node %{inner.name}: slices the token axis"):
        derive_decode(gm, 4)


def test_a_reshape_merging_the_tokens_is_refused_naming_it():
    gm = _front("llama", float64=False)
    flat = _insert_after_embedding(gm, aten.view.default, [1, SEQ * 64])
    back = insert_call(gm.graph, next(iter(flat.users)), aten.view.default, flat, [1, SEQ, 64])
    flat.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
    gm.recompile()
    with pytest.raises(GraphStructureError, match=f"node %{flat.name}: reshape merges or splits a token axis"):
        derive_decode(gm, 4)


def test_a_mask_that_is_not_causal_is_refused_naming_it():
    """A sliding window narrower than the sequence would make decode silently different."""
    gm = _front("llama", float64=False)
    mask = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_folded_expand"))
    window = torch.ones(SEQ, SEQ, dtype=torch.bool).tril() & ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril(-4)
    setattr(gm, mask.target, window.expand(1, 1, SEQ, SEQ).clone())
    with pytest.raises(GraphStructureError, match=f"node %{mask.name}: attention mask is not causal"):
        derive_decode(gm, 4)
    with pytest.raises(GraphStructureError, match="attention mask is not causal"):  # the prefill too
        derive_prefill(gm, 4)


def test_positions_beyond_the_graph_and_graphs_without_roles_are_refused():
    gm = _front("llama", float64=False)
    with pytest.raises(GraphStructureError, match=r"node %input_ids: decode of 1 token\(s\) after 12 cache slot\(s\) "
                                                  r"reaches position 12, beyond the graph's 12 positions"):
        derive_decode(gm, SEQ)
    plain = export_causal_lm(tiny_model("llama", layers=1), SEQ).module()
    with pytest.raises(GraphStructureError, match="no decoder roles on the graph: run Canonicalize, FoldConstants and AnnotateRoles"):
        derive_prefill(plain)
    with pytest.raises(GraphStructureError, match=r"node %input_ids: prefill of 13"):
        derive_prefill(gm, SEQ + 1)


def test_the_split_leading_tokens_graph_prefills_with_the_split_and_decodes_without_it():
    """SplitLeadingTokens' split: the prefill (from position 0) keeps it, with the head slice's size
    fixed and the rest resized; the decode graph is derived from the graph without it (the rest
    copy reads every token; the join is a one-piece cat). The same logits as the split graph."""
    from quantnpu.graph.decode import leading_tokens, unsplit_leading_tokens
    from quantnpu.passes.split_leading_tokens import LeadingTokenSplit, SplitLeadingTokens

    gm = _front("llama")
    calibration = [sample_token_ids(gm, seed) for seed in range(2)]
    split = PassManager([SplitLeadingTokens(calibration, LeadingTokenSplit(mode="all"))], verify=False).run(copy.deepcopy(gm))
    assert leading_tokens(split) == 1 and leading_tokens(gm) == 0
    ids = sample_token_ids(gm, seed=1)
    full = split(ids)
    for prompt, prefill_tokens in ((3, 8), (1, SEQ - 1)):
        cached = _cached_logits(split, ids, prompt=prompt, prefill_tokens=prefill_tokens, cache_slots=SEQ - 1)
        assert relative_max(cached, full) < 1e-5
    decode = derive_decode(split, 4)
    assert not any(n.target == aten.slice.Tensor and n.args[1] == 1 for n in decode.module.graph.nodes)
    assert not any("@leading" in str(n.meta.get("quantnpu", "")) for n in decode.module.graph.nodes)
    assert any("@leading" in str(n.meta.get("quantnpu", "")) for n in derive_prefill(split, 8).module.graph.nodes)
    plain = unsplit_leading_tokens(split)
    assert relative_max(plain(ids)[0], full) < 1e-12 and unsplit_leading_tokens(gm) is gm
    with pytest.raises(GraphStructureError, match="splits off 1 leading token"):
        derive_prefill(split, 1)


# ---- SmolLM2-135M (slow) -----------------------------------------------------------------------

REAL_SEQ = 128
PROMPTS = ("The history of the printing press begins", "def fibonacci(n):\n", "Once upon a time, in a small village,")


@pytest.fixture(scope="module")
def smollm2_graph():
    from quantnpu.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    gm = export_causal_lm(model, REAL_SEQ).module()
    gm = PassManager([Canonicalize(), FoldConstants(), AnnotateRoles()]).run(gm)
    return model, tokenizer, gm


@pytest.mark.slow
def test_smollm2_decode_gives_the_full_sequence_logits(smollm2_graph):
    from quantnpu.models.corpus import split_tokens, token_windows

    _, tokenizer, gm = smollm2_graph
    exact = as_float64(gm)
    window = token_windows(split_tokens(tokenizer, "evaluation"), REAL_SEQ, 1)
    with torch.no_grad():
        full = exact(window)
        cached = _cached_logits(exact, window, prompt=20, prefill_tokens=32, cache_slots=REAL_SEQ - 1)
    difference = relative_max(cached, full)
    print(f"SmolLM2-135M, float64: prefill 20 of 32 tokens + 108 decode steps vs the 128-token graph: "
          f"max relative difference {difference:.2e}")
    assert difference < 1e-5
    decode = derive_decode(gm, REAL_SEQ - 1)
    assert decode.layers == 30 and decode.k_shapes[0] == decode.v_shapes[0] == (1, 3, REAL_SEQ - 1, 64)


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_transformers_generate(smollm2_graph):
    """64 greedy tokens through prefill + decode (float32) against transformers' own `generate`
    (greedy, with its KV cache); a divergence is accepted only at a near-tie of our top-2 logits."""
    model, tokenizer, gm = smollm2_graph
    prefill, decode = derive_prefill(gm, 32), derive_decode(gm, REAL_SEQ - 1)
    eos = {tokenizer.eos_token_id} | set(torch.tensor(model.generation_config.eos_token_id or []).flatten().tolist())
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                       pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
            runner = KvCacheRunner(prefill, decode)
            logits = runner.prefill(ids)[:, -1]
            ours, margins = [], []
            while len(ours) < 64:
                top = logits[0].topk(2)
                ours.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                if ours[-1] in eos:
                    break
                logits = runner.step(torch.tensor([[ours[-1]]]))[:, -1]
        same = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
        print(f"{prompt!r}: {same} of {len(reference)} greedy tokens equal to transformers' generate"
              + (f"; first divergence at step {same}, top-2 margin {margins[same]:.2e}" if same < len(reference) else "")
              + f"; smallest margin before it {min(margins[:same] or [float('nan')]):.3f}")
        if same < len(reference):
            assert margins[same] < 1e-3, f"confident divergence at step {same} (margin {margins[same]:.3f}) for {prompt!r}"
        else:
            assert ours == reference
