"""One JSON record per run: what ran, on which data, with which packages, and how long it took."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from quantnpu.fileio import atomic_write_text

PACKAGES = ("torch", "executorch", "torchao", "transformers", "onnxruntime-qnn", "gguf", "quantnpu")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    from quantnpu.lowering.qnn_sdk import active_sdk

    sdk = active_sdk()
    if sdk is not None:
        versions["qnn-libraries"] = sdk.version_text + (" (ABI bridge)" if sdk.bridged else "")
    versions["python"] = platform.python_version()
    return versions


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far, in MiB (quantnpu.memory keeps it across the
    per-stage resets of the kernel's mark)."""
    from quantnpu.memory import process_peak_mib

    return process_peak_mib()


def write_record(path: str | Path, record: dict) -> Path:
    record = {**record, "packages": package_versions(), "peak_memory_mib": round(peak_memory_mib(), 1)}
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return Path(path)
