"""Export a causal LM's prefill (input_ids -> logits, static length) and `.pt2` I/O."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from quantnpu.errors import InputFileError
from quantnpu.fileio import atomic_path


class CausalLMPrefill(torch.nn.Module):
    """`input_ids [batch, seq] -> logits [batch, seq, vocab]`.

    `use_cache=False` (the default) exports without a KV cache; `use_cache=None` calls the model
    with its own defaults, the way Hugging Face users usually export (the graph then carries
    the cache's artefacts). A model that is not a Hugging Face `*ForCausalLM` (ExecuTorch's
    `Transformer`) is called with the ids alone and must return the logits."""

    def __init__(self, model: torch.nn.Module, use_cache: bool | None = False) -> None:
        super().__init__()
        self.model = model
        self.use_cache = use_cache
        self.hugging_face = hasattr(model, "config") and hasattr(model, "generation_config")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.hugging_face:
            return self.model(input_ids)
        if self.use_cache is None:
            return self.model(input_ids).logits
        return self.model(input_ids=input_ids, use_cache=self.use_cache).logits


def export_causal_lm(
    model: torch.nn.Module, seq_len: int, batch: int = 1, use_cache: bool | None = False,
) -> torch.export.ExportedProgram:
    """`torch.export` the prefill graph of a causal LM for a static shape (see `CausalLMPrefill`)."""
    example = torch.zeros(batch, seq_len, dtype=torch.int64)
    with torch.no_grad():
        return torch.export.export(CausalLMPrefill(model.eval(), use_cache), (example,))


def load_hf_model(directory: str | Path) -> torch.nn.Module:
    """A local Hugging Face causal-LM folder (config.json and weights), float32, eval mode, with
    SDPA attention where the family has it (else eager). One-line errors for a bad folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not directory.is_dir():
        raise InputFileError(f"{directory}: no such model folder")
    if not (directory / "config.json").is_file():
        raise InputFileError(f"{directory}: no config.json (not a Hugging Face model folder)")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise InputFileError(f"{directory}: no weights (*.safetensors or *.bin)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise InputFileError(f"{directory}/config.json: {str(error).strip().splitlines()[0]}") from None
    for attention in ("sdpa", "eager"):
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attention,
                                                         local_files_only=True)
            return model.eval()
        except ValueError as error:
            if attention == "sdpa" and "scaled_dot_product_attention" in str(error):
                continue  # the family has no SDPA path (Gemma-2)
            raise InputFileError(f"{directory}: cannot load a causal LM of type {config.model_type!r} "
                                 f"({str(error).strip().splitlines()[0]})") from None
        except OSError as error:
            raise InputFileError(f"{directory}: {str(error).strip().splitlines()[0]}") from None
    raise AssertionError("unreachable")


def save_pt2(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Write the program atomically (nothing half-written on failure or interrupt)."""
    path = Path(path)
    with atomic_path(path, suffix=".pt2") as tmp:
        torch.export.save(program, tmp)
    return path


def load_pt2(path: str | Path) -> torch.export.ExportedProgram:
    """Load a `.pt2` with one-line errors for a missing, foreign, truncated or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if not path.is_file():
        raise InputFileError(f"{path}: not a file")
    if not zipfile.is_zipfile(path):
        raise InputFileError(f"{path}: not a .pt2 archive (torch.export.save writes a zip file)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InputFileError(f"{path}: truncated or corrupt .pt2 ({error})") from None
    if damaged is not None:
        raise InputFileError(f"{path}: corrupt .pt2 (member {damaged} fails its checksum)")
    try:
        return torch.export.load(path)
    except Exception as error:  # torch raises many kinds for a damaged or foreign archive
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputFileError(f"{path}: cannot load as a torch.export program ({first_line})") from None


def token_input_spec(program: torch.export.ExportedProgram, path: str | Path = "<program>") -> tuple[int, int]:
    """`(batch, seq_len)` of a decoder program's single input_ids input, or a clear error."""
    user_inputs = [
        spec for spec in program.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    if len(user_inputs) != 1:
        raise InputFileError(
            f"{path}: a decoder LM program takes one input (input_ids), this one takes {len(user_inputs)}"
        )
    value = placeholders[user_inputs[0].arg.name].meta.get("val")
    if value is None or value.dtype not in (torch.int64, torch.int32) or value.dim() != 2:
        raise InputFileError(
            f"{path}: input {user_inputs[0].arg.name} must be integer token ids [batch, seq], "
            f"got {None if value is None else (value.dtype, tuple(value.shape))}"
        )
    batch, seq_len = value.shape
    return int(batch), int(seq_len)
