"""Tiny random-weight decoders for unit tests, shaped like the real targets.

`tiny_llama`: grouped-query attention and tied embeddings, like SmolLM2.
`tiny_qwen2`: q/k/v biases, untied embeddings, like Qwen2.
RMSNorm weights are randomized (not all ones) so that passes touching them are observable.
"""

from __future__ import annotations

import torch


def _randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, parameter in model.named_parameters():
        if "norm" in name:
            with torch.no_grad():
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))


def _build(model_class, config, seed: int):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _randomize_norms(model, torch.Generator().manual_seed(seed))
    return model


def _shape_config(layers, hidden, heads, kv_heads, intermediate, vocab) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        attn_implementation="sdpa",
    )


def tiny_llama(
    layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
    vocab: int = 128, tied: bool = True, seed: int = 0,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_shape_config(layers, hidden, heads, kv_heads, intermediate, vocab),
                         head_dim=hidden // heads, tie_word_embeddings=tied)
    return _build(LlamaForCausalLM, config, seed)


def tiny_qwen2(
    layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
    vocab: int = 128, seed: int = 0,
):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_shape_config(layers, hidden, heads, kv_heads, intermediate, vocab), tie_word_embeddings=False)
    model = _build(Qwen2ForCausalLM, config, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model
