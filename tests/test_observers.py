"""EncodingObserver's streaming statistics, and its switch from observing to fixed fake-quant."""

import torch

from quantnpu.quantizers.encodings import Encoding
from quantnpu.quantizers.init_rules import TensorStats
from quantnpu.quantizers.observers import HISTOGRAM_BINS, EncodingObserver, RunningStats


def test_streaming_statistics_equal_the_whole_tensors():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 7, generator=generator) * (i + 1) for i in range(4)]
    for axis in (None, 0):
        stats = RunningStats(axis)
        for batch in batches:
            stats.update(batch.clone())  # fresh storage each time, as activations are
        whole = TensorStats.of(torch.cat(batches, dim=1), axis)
        streamed = stats.tensor_stats()
        for name in ("minimum", "maximum", "mean", "std"):
            assert torch.allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-6, atol=1e-9), (axis, name)
        assert stats.histogram.shape == (HISTOGRAM_BINS,)  # bounded, whatever was observed
        assert int(stats.histogram.sum()) == sum(b.numel() for b in batches)  # small tensors: every element


def test_a_constant_is_counted_once():
    weight = torch.randn(4, 8)
    stats = RunningStats(0)
    for _ in range(3):
        stats.update(weight)
    assert stats.count == 8
    weight.mul_(2)  # changed in place (as learning will): new values, counted
    stats.update(weight)
    assert stats.count == 16


def test_a_new_activation_at_a_reused_address_is_counted():
    """The allocator gives the next window's activation the freed address of the last one (same
    shape, version 0). It is new data and must be observed: when such tensors were skipped,
    calibrating SmolLM2 twice on the same windows gave 276 of 2197 different encodings."""
    buffer = torch.zeros(4, 8).numpy()
    stats = RunningStats(None)
    stats.update(torch.from_numpy(buffer))
    buffer[:] = 5.0  # the same storage with new contents; numpy writes do not bump the version
    stats.update(torch.from_numpy(buffer))
    assert stats.count == 64
    assert float(stats.tensor_stats().maximum) == 5.0


def test_observer_turns_into_a_fixed_fake_quantizer():
    observer = EncodingObserver()
    x = torch.linspace(-1, 1, 11)
    assert torch.equal(observer(x), x) and observer.stats.count == 11
    observer.set_storage(8, weight=False)
    observer.encoding = Encoding(bits=8, scale=(0.25,))
    assert torch.equal(observer(x), Encoding(bits=8, scale=(0.25,)).fake_quantize(x))
    scale, zero_point = observer.calculate_qparams()
    assert float(scale) == 0.25 and int(zero_point) == 128  # unsigned storage, offset 2^(b-1)
    assert (observer.dtype, observer.quant_min, observer.quant_max) == (torch.uint8, 0, 255)
