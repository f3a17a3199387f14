"""The QNN x86 libraries from the `onnxruntime-qnn` wheel, laid out as a QNN SDK.

ExecuTorch's QNN code looks for `$QNN_SDK_ROOT/lib/x86_64-linux-clang/` and dlopens
`libQnnHtp.so` / `libQnnSystem.so` by name. This module:

1. finds the libraries in the installed wheel (libQnnHtp, libHtpPrepare — QNN SDKs call it
   libQnnHtpPrepare, so both names are provided —, libQnnSystem, the bundled libc++/libunwind);
2. hard-links them (copies across file systems) into `<cache>/qnn/<version>/lib/x86_64-linux-clang/`;
3. reads the library's QNN version and, from 2.47 on, builds the ABI bridge
   (`qnn_htp_bridge.c`, see its header) with the machine's C compiler as the `libQnnHtp.so`
   of the layout, the real library staying beside it as `libQnnHtpReal.so`;
4. `activate()` sets QNN_SDK_ROOT (which also stops ExecuTorch from downloading an SDK) and
   loads the layout's libraries into the process, so ExecuTorch's later `dlopen("libQnnHtp.so")`
   finds them by soname. It must run after torch is imported: loading QNN's libc++ first
   breaks torch's own C++ runtime.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from quantnpu.errors import QnnSetupError
from quantnpu.fileio import atomic_directory
from quantnpu.paths import cache_dir

LIB_SUBDIR = Path("lib") / "x86_64-linux-clang"
BRIDGE_SOURCE = Path(__file__).with_name("qnn_htp_bridge.c")
# QNN 2.47 moved the union of QnnHtpDevice_CustomConfig_t from offset 4 to 8.
BRIDGE_NEEDED_FROM = (2, 47)
_VERSION_PATTERN = re.compile(rb"v(\d+)\.(\d+)\.(\d+)\.\d{6,}")
_WHEEL_LIBS = ("libQnnHtp.so", "libHtpPrepare.so", "libQnnSystem.so")


@dataclass(frozen=True)
class QnnSdk:
    root: Path
    version: tuple[int, int, int]
    bridged: bool

    @property
    def lib_dir(self) -> Path:
        return self.root / LIB_SUBDIR

    @property
    def real_htp(self) -> Path:
        return self.lib_dir / ("libQnnHtpReal.so" if self.bridged else "libQnnHtp.so")

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


LIB_DIR_ENV = "QUANTNPU_QNN_LIB_DIR"


def wheel_library_dir() -> Path:
    """Where the QNN x86 libraries are: `$QUANTNPU_QNN_LIB_DIR` if set (e.g. a QNN SDK's
    lib/x86_64-linux-clang), else the installed onnxruntime-qnn wheel (found, not imported)."""
    if os.environ.get(LIB_DIR_ENV):
        directory = Path(os.environ[LIB_DIR_ENV])
    else:
        spec = importlib.util.find_spec("onnxruntime_qnn")
        if spec is None or not spec.submodule_search_locations:
            raise QnnSetupError("QNN libraries missing: the onnxruntime-qnn wheel is not installed (run scripts/setup.sh)")
        directory = Path(list(spec.submodule_search_locations)[0])
    missing = [name for name in _WHEEL_LIBS if not (directory / name).is_file()]
    if missing:
        raise QnnSetupError(f"QNN libraries missing: {', '.join(missing)} not in {directory}")
    return directory


def library_version(path: Path) -> tuple[int, int, int]:
    """QNN release of a QNN library, from the build id it embeds (e.g. v2.51.0.260929181845)."""
    with open(path, "rb") as handle:
        data = handle.read()
    match = _VERSION_PATTERN.search(data)
    if match is None:
        raise QnnSetupError(f"{path}: no QNN build id found; not a QNN library?")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def bridge_needed(version: tuple[int, int, int]) -> bool:
    return version[:2] >= BRIDGE_NEEDED_FROM


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_bridge(output: Path) -> Path:
    """Compile the bridge with the machine's C compiler (gcc or cc) to `output`."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise QnnSetupError("a C compiler (gcc) is needed to build the QNN ABI bridge")
    command = [compiler, "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall",
               "-Wl,-soname,libQnnHtp.so", "-o", str(output), str(BRIDGE_SOURCE), "-ldl", "-lpthread"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise QnnSetupError(f"building the QNN bridge failed: {result.stderr.strip()}")
    return output


def prepare_qnn_sdk(bridge: bool | None = None) -> QnnSdk:
    """Lay out (once) and return the QNN SDK directory. `bridge=None` decides by version."""
    wheel = wheel_library_dir()
    version = library_version(wheel / "libQnnHtp.so")
    bridged = bridge_needed(version) if bridge is None else bridge
    # Keyed by source directory and bridge source, so changing either lays out a new SDK.
    key = str(wheel.resolve()).encode() + (BRIDGE_SOURCE.read_bytes() if bridged else b"plain")
    source_tag = hashlib.sha256(key).hexdigest()[:10] + ("-bridged" if bridged else "-plain")
    root = cache_dir() / "qnn" / f"{'.'.join(map(str, version))}-{source_tag}"
    sdk = QnnSdk(root=root, version=version, bridged=bridged)
    if (sdk.lib_dir / "libQnnHtp.so").is_file() and sdk.real_htp.is_file():
        return sdk
    with atomic_directory(root) as staging:
        lib_dir = staging / LIB_SUBDIR
        lib_dir.mkdir(parents=True)
        _link_or_copy(wheel / "libQnnHtp.so", lib_dir / sdk.real_htp.name)
        _link_or_copy(wheel / "libHtpPrepare.so", lib_dir / "libHtpPrepare.so")
        _link_or_copy(wheel / "libHtpPrepare.so", lib_dir / "libQnnHtpPrepare.so")
        _link_or_copy(wheel / "libQnnSystem.so", lib_dir / "libQnnSystem.so")
        # The wheel's libraries find their libc++/libunwind through RPATH $ORIGIN/../onnxruntime_qnn.libs.
        for bundled in (wheel / "../onnxruntime_qnn.libs", wheel):
            for runtime in sorted(bundled.glob("lib*.so*")) if bundled.is_dir() else []:
                if runtime.name.startswith(("libc++", "libunwind")) and not (lib_dir / runtime.name).exists():
                    _link_or_copy(runtime, lib_dir / runtime.name)
        if bridged:
            build_bridge(lib_dir / "libQnnHtp.so")
    return sdk


_active: tuple[QnnSdk, list[ctypes.CDLL]] | None = None


def activate(sdk: QnnSdk | None = None) -> QnnSdk:
    """Make ExecuTorch's QNN backend use `sdk` in this process; with no argument, keep the layout
    already active, else activate `prepare_qnn_sdk()`.

    Idempotent; activating a different layout once libraries are loaded is an error, since a
    process cannot unload them.
    """
    global _active
    import torch  # noqa: F401  (torch's C++ runtime must be loaded before QNN's libc++)

    if sdk is None and _active is not None:
        return _active[0]
    sdk = sdk or prepare_qnn_sdk()
    if _active is not None:
        if _active[0] != sdk:
            raise QnnSetupError(f"QNN already active from {_active[0].root}; cannot switch to {sdk.root} in one process")
        return sdk
    os.environ["QNN_SDK_ROOT"] = str(sdk.root)
    os.environ["QUANTNPU_QNN_HTP_REAL"] = str(sdk.real_htp)
    paths = os.environ.get("LD_LIBRARY_PATH", "")
    if str(sdk.lib_dir) not in paths.split(":"):  # for child processes; this one is served by the loads below
        os.environ["LD_LIBRARY_PATH"] = f"{sdk.lib_dir}:{paths}" if paths else str(sdk.lib_dir)
    try:
        handles = [ctypes.CDLL(str(sdk.lib_dir / name)) for name in ("libQnnHtp.so", "libQnnSystem.so")]
    except OSError as error:
        raise QnnSetupError(f"cannot load the QNN libraries in {sdk.lib_dir}: {error}") from None
    _active = (sdk, handles)
    return sdk


def active_sdk() -> QnnSdk | None:
    return _active[0] if _active else None
