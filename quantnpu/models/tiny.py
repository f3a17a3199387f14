"""Tiny random-weight decoders for unit tests, one per family the passes must handle.

Built from each family's own definition (transformers' config classes, ExecuTorch's `ModelArgs` /
`construct_transformer`), small enough to export in a second:
- `llama`: grouped-query attention and tied embeddings, like SmolLM2;
- `mistral`: the Llama structure under Mistral's classes;
- `qwen2`: q/k/v biases, untied embeddings;
- `qwen3`: per-head RMSNorm on q and k;
- `gemma2` / `gemma3`: sandwich norms (also after attention and MLP), `1 + w` norm weights, a
  scaled embedding, a GELU-tanh gate; Gemma-2 caps its logits, Gemma-3 has q/k norms;
- `et-llama`: ExecuTorch's own Llama (`llama_transformer.Transformer`, HF RoPE, full logits, no
  KV cache): `type_as` casts in RMSNorm, `repeat_interleave` for GQA, a sliced mask buffer.
Norm weights (and biases) are random, not ones/zeros, so that passes touching them are observable.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "et-llama")


def _randomize(model: torch.nn.Module, generator: torch.Generator, offset: float) -> None:
    """Norm weights to offset + N(0, 0.2^2) (offset 0 for `1 + w` norms), biases to N(0, 0.1^2)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(offset + 0.2 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def _shape_config(layers, hidden, heads, kv_heads, intermediate, vocab) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        head_dim=hidden // heads, attn_implementation="sdpa",
    )


def tiny_model(
    family: str, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
    vocab: int = 128, tied: bool | None = None, seed: int = 0,
) -> torch.nn.Module:
    """A random `family` decoder (see the module docstring) in eval mode."""
    import transformers

    shape = _shape_config(layers, hidden, heads, kv_heads, intermediate, vocab)
    torch.manual_seed(seed)
    offset = 1.0
    if family == "et-llama":
        model = _et_llama(layers, hidden, heads, kv_heads, intermediate, vocab)
    elif family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, tie_word_embeddings=True if tied is None else tied))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**shape, tie_word_embeddings=bool(tied), sliding_window=None))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=bool(tied)))
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, tie_word_embeddings=True if tied is None else tied))
    elif family == "gemma2":
        config = transformers.Gemma2Config(**shape, tie_word_embeddings=True if tied is None else tied,
                                           hidden_activation="gelu_pytorch_tanh", sliding_window=4096)
        config._attn_implementation = "eager"  # Gemma-2 has no SDPA path (attention logit soft-capping)
        model = transformers.Gemma2ForCausalLM(config)
        offset = 0.0
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(**shape, tie_word_embeddings=True if tied is None else tied,
                                               hidden_activation="gelu_pytorch_tanh", sliding_window=4096)
        model = transformers.Gemma3ForCausalLM(config)
        offset = 0.0
    else:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    model = model.eval()
    _randomize(model, torch.Generator().manual_seed(seed), offset)
    return model


def _et_llama(layers, hidden, heads, kv_heads, intermediate, vocab) -> torch.nn.Module:
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    args = ModelArgs(dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, vocab_size=vocab,
                     hidden_dim=intermediate, max_seq_len=512, max_context_len=512, use_hf_rope=True,
                     generate_full_logits=True, use_kv_cache=False)
    return construct_transformer(args)


def tiny_llama(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
               vocab: int = 128, tied: bool = True, seed: int = 0):
    return tiny_model("llama", layers, hidden, heads, kv_heads, intermediate, vocab, tied, seed)


def tiny_qwen2(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
               vocab: int = 128, seed: int = 0):
    return tiny_model("qwen2", layers, hidden, heads, kv_heads, intermediate, vocab, False, seed)
