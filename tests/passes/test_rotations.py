"""UntieEmbeddings, FoldNorms, FuseRotations, BakeRotations together compute the same function
(float64: 1e-6 relative, float32: 1e-4), for any head layout and GQA ratio."""

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantnpu.passes import BakeRotations, FoldNorms, FuseRotations, UntieEmbeddings
from tests.graph_testing import annotated_graph, as_float64, relative_max, run_passes


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("rotation", ["hadamard", "random"])
def test_rotated_model_computes_the_same_logits(kind, rotation):
    ids = torch.randint(0, 128, (2, 1, 8))
    passes = [UntieEmbeddings(), FoldNorms(), FuseRotations(kind=rotation, seed=3), BakeRotations()]
    exact = as_float64(annotated_graph(kind, layers=2))
    rotated = run_passes(copy.deepcopy(exact), passes)
    single = annotated_graph(kind, layers=2)
    rotated_single = run_passes(copy.deepcopy(single), passes)
    for window in ids:
        assert relative_max(rotated(window), exact(window)) < 1e-6
        assert relative_max(rotated_single(window), single(window)) < 1e-4


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 12, 20]),
    kind=st.sampled_from(["llama", "qwen2"]),
    seed=st.integers(0, 1000),
)
def test_rotation_is_exact_for_any_head_layout(layers, kv_heads, group, head_dim, kind, seed):
    """Hidden sizes and head counts that are not powers of two, any GQA ratio."""
    heads = kv_heads * group
    config = dict(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, intermediate=3 * head_dim * heads)
    gm = as_float64(annotated_graph(kind, layers=layers, **config))
    with warnings.catch_warnings():  # sizes without a Hadamard construction fall back to QR, warning
        warnings.simplefilter("ignore", UserWarning)
        rotated = run_passes(copy.deepcopy(gm), [UntieEmbeddings(), FoldNorms(), FuseRotations(seed=seed), BakeRotations()])
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(seed))
    assert relative_max(rotated(ids), gm(ids)) < 1e-6
