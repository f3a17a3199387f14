"""Gemma-3-270M: the GGUF route on a tiny synthetic file (fast), and the real model (slow, and only
where it has been prepared: `QUANTNPU_GEMMA=1 bash scripts/setup.sh` or
`python -m quantnpu.prepare --model gemma3-270m`)."""

import hashlib

import pytest
import torch

from quantnpu.errors import QuantNpuError
from quantnpu.models import gemma3
from quantnpu.models.tiny import tiny_model

# A tiny sentencepiece-style vocabulary: the four specials where Gemma has them, then pieces.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
PIECES = ["\u2581", "a", "b", "c", "d", "\u2581a", "\u2581b", "ab", "cd", "\u2581ab", "\u2581cd", "abcd"]
TOKENS = SPECIALS + PIECES + [f"<unused{i}>" for i in range(64 - len(SPECIALS) - len(PIECES))]


def write_gemma3_gguf(path, model, quantize_embedding=True):
    """`model` (a Gemma3ForCausalLM) as llama.cpp writes a Gemma-3 GGUF: its metadata keys, its tensor
    names, norm weights stored as `1 + w`, no output.weight (tied); the embedding in Q8_0."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        base, suffix = name.rsplit(".", 1)
        data = tensor.float().numpy()
        if base.endswith("norm"):
            data = data + 1.0
        if name == "model.embed_tokens.weight" and quantize_embedding:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny():
    # six layers: five sliding, then the first full-attention layer of Gemma-3's pattern
    return tiny_model("gemma3", layers=6, hidden=64, heads=2, kv_heads=1, intermediate=128, vocab=len(TOKENS))


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    gguf_path = write_gemma3_gguf(root / "tiny.gguf", tiny)
    return gemma3.convert_gguf(gguf_path, root / "converted", facts=None)


def test_chunks_concatenate_in_order_and_are_checked(tmp_path):
    chunks = []
    for index, data in enumerate([b"GGUF", b"-part-", b"two", b""]):
        chunks.append(tmp_path / f"x.gguf.part{index:02d}")
        chunks[-1].write_bytes(data)
    good = hashlib.sha256(b"GGUF-part-two").hexdigest()
    assert gemma3.assemble_gguf(tmp_path / "x.gguf", chunks, good).read_bytes() == b"GGUF-part-two"
    with pytest.raises(QuantNpuError, match="sha256"):
        gemma3.assemble_gguf(tmp_path / "y.gguf", chunks[::-1], good)
    assert not (tmp_path / "y.gguf").exists()


def test_missing_chunk_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gemma3, "GGUF_CHUNKS", (("quantnpu_no_such_package_part1", "x.part00"),))
    with pytest.raises(QuantNpuError, match="QUANTNPU_GEMMA=1 bash scripts/setup.sh"):
        gemma3.gguf_chunk_paths()


def test_the_gguf_metadata_of_gemma3_270m_gives_its_own_config(tmp_path):
    """The real file's metadata (no tensors) through transformers' GGUF config mapping: what the
    file leaves out (layer pattern, local RoPE base, query scale, no soft-capping) comes out as
    google/gemma-3-270m has it."""
    import gguf
    from transformers import Gemma3TextConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    writer = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "gemma3")
    writer.add_context_length(32768)
    writer.add_embedding_length(640)
    writer.add_block_count(18)
    writer.add_feed_forward_length(2048)
    writer.add_head_count(4)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_key_length(256)
    writer.add_value_length(256)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(512)
    # the real file has no such key: transformers counts its 262144 tokens instead (not written here)
    writer.add_uint32("gemma3.vocab_size", 262144)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    config = load_gguf_checkpoint(str(tmp_path / "meta.gguf"))["config"]
    config["tie_word_embeddings"] = True
    gemma3.check_config(Gemma3TextConfig.from_dict(config))


def test_check_config_names_what_differs():
    from transformers import Gemma3TextConfig

    facts = {k: v for k, v in gemma3.CONFIG_FACTS.items() if k != "model_type"}
    config = Gemma3TextConfig(**{**facts, "sliding_window": 4096, "rope_parameters": None})
    with pytest.raises(QuantNpuError, match="sliding_window: got 4096, expected 512"):
        gemma3.check_config(config)


def test_converted_weights_are_the_gguf_weights(tiny, converted):
    """Names mapped, `1 + w` norms back to `w`, the Q8_0 embedding dequantized by gguf, lm_head tied."""
    import gguf
    from safetensors.torch import load_file

    state = load_file(str(converted / "model.safetensors"))
    original = tiny.state_dict()
    assert set(state) <= set(original) and set(original) - set(state) <= {"lm_head.weight"}
    kind = gguf.GGMLQuantizationType.Q8_0
    embedding = original["model.embed_tokens.weight"].numpy()
    expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(embedding, kind), kind))
    torch.testing.assert_close(state["model.embed_tokens.weight"], expected, rtol=0, atol=0)
    for name, tensor in state.items():
        if name != "model.embed_tokens.weight":
            torch.testing.assert_close(tensor, original[name], rtol=0, atol=1e-6, msg=name)


def test_converted_model_computes_the_original_logits(tiny, converted):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True).eval()
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = tiny_model("gemma3", layers=6, hidden=64, heads=2, kv_heads=1, intermediate=128, vocab=len(TOKENS))
    reference.model.embed_tokens.weight.data.copy_(model.model.embed_tokens.weight)  # the Q8_0 rounding
    ids = torch.randint(0, len(TOKENS), (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_converted_tokenizer_reads_the_gguf_vocabulary(converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converted), local_files_only=True)
    ids = tokenizer("abcd ab")["input_ids"]
    assert ids[0] == 2  # <bos>, as the file asks
    assert tokenizer.decode(ids, skip_special_tokens=True) == "abcd ab"


# ---- the real model (slow; skipped where it is not prepared) ------------------------------------

SEQ = 128
needs_gemma = pytest.mark.skipif(
    not gemma3.is_gemma3_prepared(),
    reason="Gemma-3-270M is not prepared (optional): QUANTNPU_GEMMA=1 bash scripts/setup.sh",
)


@pytest.fixture(scope="module")
def gemma():
    return gemma3.load_gemma3()


@pytest.fixture(scope="module")
def window(gemma):
    from quantnpu.models.corpus import split_tokens, token_windows

    return token_windows(split_tokens(gemma[1], "evaluation"), SEQ, 1)


@pytest.fixture(scope="module")
def program(gemma):
    from quantnpu.models.export import export_causal_lm

    return export_causal_lm(gemma[0], SEQ)


@pytest.mark.slow
@needs_gemma
def test_real_exported_graph_computes_the_eager_logits(gemma, window, program):
    with torch.no_grad():
        eager = gemma[0](input_ids=window, use_cache=False).logits
        graph = program.module()(window)
    assert graph.shape == (1, SEQ, 262144)
    assert ((graph - eager).abs().max() / eager.abs().max()).item() < 1e-4


@pytest.mark.slow
@needs_gemma
def test_real_roles_of_all_18_layers(program):
    """Canonicalized and folded, the graph is recognized: 14 roles per layer (q/k norms and the
    sandwich norms included) plus embedding, final norm and lm_head."""
    from quantnpu.passes import PassManager
    from quantnpu.passes.annotate_roles import find_roles
    from quantnpu.pipeline import float_passes

    # verify=False: the verifier's float64 copy of a 268M-parameter graph costs ~3 GiB per pass;
    # test_real_exported_graph_computes_the_eager_logits checks the function instead.
    gm = PassManager(float_passes("none"), verify=False).run(program.module())
    roles = {info.role for info in find_roles(gm).values()}
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_norm",
                 "post_attention_norm", "q_norm", "k_norm", "attention_output_norm", "mlp_output_norm", "attention"}
    assert roles == {"embedding", "final_norm", "lm_head"} | {f"layers.{i}.{r}" for i in range(18) for r in per_layer}


@pytest.mark.slow
@needs_gemma
def test_real_float_perplexity_is_sane(gemma):
    """2 x 512 Brown evaluation tokens, scored the harness's way (no <bos> at the window start):
    130.9 (the first 8 windows: 168.1, the issue's number; with <bos> first: 60.3)."""
    from quantnpu.models.corpus import split_tokens, token_windows
    from quantnpu.runtime_harness.perplexity import eager_forward, perplexity

    windows = token_windows(split_tokens(gemma[1], "evaluation"), 512, 2)
    result = perplexity(eager_forward(gemma[0]), windows, progress=False)
    assert abs(result.ppl - 130.9) / 130.9 < 0.02, result.ppl


@pytest.mark.slow
@needs_gemma
def test_real_rotation_is_r2_only_and_keeps_the_logits(gemma, window, program):
    """Gemma's sandwich norm on o_proj's output (a per-channel weight before the residual add) does
    not commute with R1, so FuseRotations applies R2 alone and says why; the function is kept."""
    from quantnpu.diagnostics import QuantNpuWarning
    from quantnpu.passes import FuseRotations, PassManager
    from quantnpu.pipeline import float_passes

    passes = float_passes("hadamard")
    with pytest.warns(QuantNpuWarning, match="R1 not applied"):
        gm = PassManager(passes, verify=False).run(program.module())
    fuse = next(p for p in passes if isinstance(p, FuseRotations))
    assert fuse.skipped_r1 is not None and "layers.0.attention_output_norm" in fuse.skipped_r1
    with torch.no_grad():
        eager = gemma[0](input_ids=window, use_cache=False).logits
        rotated = gm(window)
    assert ((rotated - eager).abs().max() / eager.abs().max()).item() < 1e-4
