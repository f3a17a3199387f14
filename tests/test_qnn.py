"""The QNN libraries on this machine: layout, version detection, and the ABI bridge."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantnpu.errors import QnnSetupError
from quantnpu.lowering import qnn_sdk

ROOT = Path(__file__).resolve().parent.parent


def _probe(variant: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.qnn_probe", variant], cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_layout_has_the_sdk_shape_and_both_prepare_names():
    sdk = qnn_sdk.prepare_qnn_sdk()
    names = {p.name for p in sdk.lib_dir.iterdir()}
    assert {"libQnnHtp.so", "libHtpPrepare.so", "libQnnHtpPrepare.so", "libQnnSystem.so"} <= names
    assert any(n.startswith("libc++") for n in names) and any(n.startswith("libunwind") for n in names)
    assert sdk.lib_dir == sdk.root / "lib" / "x86_64-linux-clang"


def test_version_is_read_from_the_library_and_decides_the_bridge():
    version = qnn_sdk.library_version(qnn_sdk.wheel_library_dir() / "libQnnHtp.so")
    assert version >= (2, 0, 0)
    assert qnn_sdk.prepare_qnn_sdk().bridged == (version[:2] >= (2, 47))
    assert qnn_sdk.bridge_needed((2, 51, 0)) and qnn_sdk.bridge_needed((2, 47, 0))
    assert not qnn_sdk.bridge_needed((2, 46, 9)) and not qnn_sdk.bridge_needed((2, 37, 0))


def test_bridge_is_needed():
    if not qnn_sdk.prepare_qnn_sdk().bridged:
        pytest.skip("this QNN release has the layout ExecuTorch was built for; no bridge to test")
    result = _probe("plain")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: Failed to initialize QNN backend" in result.stdout
    assert re.search(r"unknown custom config socModel 0", result.stdout + result.stderr)


def test_bridge_is_sufficient():
    result = _probe("bridge")
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"LOWERED delegates=(\d+) relative_error=([\d.]+)", result.stdout)
    assert match, result.stdout
    assert int(match.group(1)) == 1
    assert float(match.group(2)) < 0.05


def test_missing_libraries_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(qnn_sdk.LIB_DIR_ENV, str(tmp_path))
    with pytest.raises(QnnSetupError, match=f"QNN libraries missing: libQnnHtp.so, libHtpPrepare.so, libQnnSystem.so not in {tmp_path}"):
        qnn_sdk.prepare_qnn_sdk()
