"""Decoder families people deploy on phones, exported the way their users export them: the float
pipeline keeps the function, the quantized program lowers to one QNN delegate and runs on the HTP
simulator; what is not supported is refused with a one-line error naming the node."""

import copy
import warnings

import pytest
import torch

from quantnpu.errors import PassFailedError
from quantnpu.models.export import export_causal_lm
from quantnpu.models.tiny import FAMILIES, tiny_model
from quantnpu.passes import FuseRotations, PassManager
from quantnpu.graph.meta import nodes_by_role, node_info
from quantnpu.graph.equivalence import as_float64, sample_token_ids
from quantnpu.pipeline import STATIC, find_pass, float_passes, pipeline
from tests.graph_testing import relative_max

SEQ = 8
# Sandwich norms (a per-channel weight on o_proj's/down_proj's output) do not commute with R1.
R2_ONLY = {"gemma2", "gemma3"}


def _export(family: str, use_cache, layers: int = 2, **config) -> torch.fx.GraphModule:
    return export_causal_lm(tiny_model(family, layers=layers, **config), SEQ, use_cache=use_cache).module()


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("use_cache", [False, None], ids=["use_cache=False", "default-export"])
@pytest.mark.parametrize("family", FAMILIES)
def test_float_pipeline_keeps_the_function(family, use_cache):
    gm = _export(family, use_cache)
    ids = sample_token_ids(gm, seed=3)
    exact = as_float64(gm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        passes = float_passes("hadamard")
        rotated64 = PassManager(passes).run(copy.deepcopy(exact))
        rotated32 = PassManager(float_passes("hadamard")).run(copy.deepcopy(gm))
    assert relative_max(rotated64(ids), exact(ids)) < 1e-6
    assert relative_max(rotated32(ids), gm(ids)) < 1e-4
    by_role = nodes_by_role(rotated32)
    skipped = find_pass(passes, FuseRotations).skipped_r1
    if family in R2_ONLY:
        assert skipped and "attention_output_norm" in skipped
        assert any("R1 not applied" in str(w.message) for w in caught)
        assert node_info(by_role["layers.0.o_proj"]).input_rotated and not node_info(by_role["lm_head"]).input_rotated
    else:
        assert skipped is None and node_info(by_role["lm_head"]).input_rotated
    if family in ("qwen3", "gemma3"):
        assert {"layers.1.q_norm", "layers.1.k_norm"} <= set(by_role)


def test_gemma_with_uniform_sandwich_norms_gets_r1():
    model = tiny_model("gemma3")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
                parameter.fill_(0.5)  # weight 1 + 0.5 on every channel: commutes with R1
    gm = export_causal_lm(model, SEQ).module()
    passes = float_passes("hadamard")
    rotated = PassManager(passes).run(copy.deepcopy(gm))
    assert find_pass(passes, FuseRotations).skipped_r1 is None
    ids = sample_token_ids(gm)
    assert relative_max(rotated(ids), gm(ids)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_program_lowers_to_one_delegate_and_runs(family, tmp_path):
    from quantnpu.lowering.lower import lower_to_qnn
    from quantnpu.runtime_harness.pte import PteModel

    gm = _export(family, None)
    calibration = [sample_token_ids(gm, seed) for seed in range(4)]
    quantized = PassManager(pipeline("8-8-8", calibration, STATIC)).run(copy.deepcopy(gm))
    lowered = lower_to_qnn(quantized, (calibration[0],), tmp_path / f"{family}.pte")
    assert lowered.delegates == 1 and lowered.outside_delegates == []
    ids = sample_token_ids(gm, seed=9)
    device, reference, float_logits = PteModel(lowered.pte_path)(ids), quantized(ids), gm(ids)
    assert torch.isfinite(device).all()
    # The .pte computes the Q/DQ graph up to HTP's own rounding (requantization, LUT activations):
    # measured 1-5% relative L2 on these tiny models (Gemma-2 the largest), against ~140% for
    # unrelated logits. Closing that gap is the .pte-fidelity issue's work; this bound catches a
    # program that runs but computes something else.
    device_error, quantization_error = _relative_l2(device, reference), _relative_l2(reference, float_logits)
    print(f"{family}: .pte vs Q/DQ {device_error:.4f}, Q/DQ vs float {quantization_error:.4f}")
    assert device_error < 0.1, (device_error, quantization_error)


def _refused(model, pattern):
    gm = export_causal_lm(model.eval(), SEQ).module()
    with pytest.raises(PassFailedError, match=pattern) as error:
        PassManager(float_passes("hadamard")).run(gm)
    assert "\n" not in str(error.value)


def test_fused_qkv_projection_is_refused():
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, attn_implementation="sdpa")
    _refused(Phi3ForCausalLM(config), r"AnnotateRoles failed: node %\w+: a fused q/k/v projection")


def test_layer_norm_is_refused():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           max_position_embeddings=64, attn_implementation="sdpa")
    _refused(GPTNeoXForCausalLM(config), r"AnnotateRoles failed: node %\w+: LayerNorm .* not supported")


class _HandWrittenDecoder(torch.nn.Module):
    """A decoder as another compiler might hand it over: `torch.nn.RMSNorm` (exported whole as
    `aten.rms_norm`), no module names of any known family; `parallel` = GPT-J-style blocks in
    which attention and MLP read one norm."""

    def __init__(self, parallel: bool, vocab: int = 64, hidden: int = 32, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.parallel, self.heads = parallel, heads
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(hidden, eps=1e-6) for _ in range(3))
        self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate, self.up = (torch.nn.Linear(hidden, 2 * hidden, bias=False) for _ in range(2))
        self.down = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            for norm in self.norms:
                norm.weight.copy_(1 + 0.2 * torch.randn(hidden))

    def forward(self, ids):
        x = self.embed(ids)
        h = self.norms[0](x)
        b, s, d = h.shape

        def heads(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        attention = torch.nn.functional.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), is_causal=True)
        attention = self.o(attention.transpose(1, 2).reshape(b, s, d))
        if not self.parallel:
            x = x + attention
            h = self.norms[1](x)
        mlp = self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        x = x + attention + mlp if self.parallel else x + mlp
        return self.head(self.norms[2](x))


def test_hand_written_decoder_with_torch_rms_norm_is_recognised_and_exact():
    model = _HandWrittenDecoder(parallel=False).eval()
    gm = torch.export.export(model, (torch.zeros(1, SEQ, dtype=torch.int64),)).module()
    assert any(n.target == torch.ops.aten.rms_norm.default for n in gm.graph.nodes)
    rotated = PassManager(float_passes("hadamard")).run(copy.deepcopy(gm))
    ids = sample_token_ids(gm)
    assert relative_max(rotated(ids), gm(ids)) < 1e-4
    assert node_info(nodes_by_role(rotated)["lm_head"]).input_rotated


def test_parallel_attention_and_mlp_blocks_are_refused():
    model = _HandWrittenDecoder(parallel=True).eval()
    gm = torch.export.export(model, (torch.zeros(1, SEQ, dtype=torch.int64),)).module()
    with pytest.raises(PassFailedError, match=r"AnnotateRoles failed: node %\w+: RMSNorm output feeds 5 linears.*parallel attention and MLP"):
        PassManager(float_passes("hadamard")).run(gm)
