"""Export of a prefill graph and .pt2 files: round trip, and every way a file can be bad."""

import pytest
import torch

from quantnpu.errors import InputFileError
from quantnpu.models.export import export_causal_lm, load_pt2, save_pt2, token_input_spec
from quantnpu.models.tiny import tiny_llama, tiny_qwen2


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_exported_graph_computes_the_eager_logits(make):
    model = make(layers=2)
    program = export_causal_lm(model, 12)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert token_input_spec(program) == (1, 12)


def test_pt2_round_trip(tmp_path):
    program = export_causal_lm(tiny_llama(layers=1), 8)
    path = save_pt2(program, tmp_path / "tiny.pt2")
    loaded = load_pt2(path)
    ids = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(loaded.module()(ids), program.module()(ids), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pt2"]  # no temporary file left


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory):
    return save_pt2(export_causal_lm(tiny_llama(layers=1), 8), tmp_path_factory.mktemp("pt2") / "good.pt2")


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match=f"{tmp_path / 'nope.pt2'}: no such file"):
        load_pt2(tmp_path / "nope.pt2")


def test_not_a_pt2(tmp_path):
    path = tmp_path / "model.pt2"
    path.write_text("this is not an archive")
    with pytest.raises(InputFileError, match="not a .pt2 archive"):
        load_pt2(path)


def test_truncated_file(tmp_path, good_pt2):
    path = tmp_path / "truncated.pt2"
    data = good_pt2.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="truncated.pt2: (not a .pt2 archive|truncated or corrupt)"):
        load_pt2(path)


def test_corrupt_member(tmp_path, good_pt2):
    data = bytearray(good_pt2.read_bytes())
    middle = len(data) // 2  # inside a stored weight: flip bytes, keep the archive's directory intact
    data[middle: middle + 64] = bytes(b ^ 0xFF for b in data[middle: middle + 64])
    path = tmp_path / "corrupt.pt2"
    path.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="corrupt.pt2: (corrupt .pt2|truncated or corrupt|cannot load)"):
        load_pt2(path)


def test_program_that_is_not_token_ids_to_logits(tmp_path):
    program = torch.export.export(torch.nn.Linear(4, 4), (torch.ones(1, 4),))
    with pytest.raises(InputFileError, match="must be integer token ids"):
        token_input_spec(program, "linear.pt2")
