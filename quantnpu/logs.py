"""Backend output stays quiet unless asked for (`--verbose`).

ExecuTorch's and torchao's Python loggers write INFO lines by the thousand while lowering, and
QNN's and ExecuTorch's native libraries print straight to the process's stdout/stderr. Quiet
mode disables logging below ERROR, and points file descriptors 1 and 2 at a temporary file while
Python's own `sys.stdout`/`sys.stderr` (prints, progress bars, warnings) keep the terminal; when
the run fails, the native output's last lines are shown, since they may say why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

NATIVE_TAIL_LINES = 20


class RunStatus:
    """Set `failed` for a run that ends in an error without raising (a CLI's exit code)."""

    failed = False


@contextlib.contextmanager
def quiet_backends(verbose: bool = False) -> Iterator[RunStatus]:
    status = RunStatus()
    if verbose:
        logging.basicConfig(level=logging.INFO)
        yield status
        return
    logging.disable(logging.WARNING)
    # torch's pytree deprecation, raised from inside torch.export / ExecuTorch, not actionable here
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    streams = (sys.stdout, sys.stderr)
    native = tempfile.TemporaryFile()
    try:
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(saved[1]), "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(saved[2]), "wb", buffering=0), write_through=True)
        for fd in (1, 2):
            os.dup2(native.fileno(), fd)
        yield status
    except BaseException:
        status.failed = True
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
        ours = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = streams
        for stream in ours:
            stream.close()
        logging.disable(logging.NOTSET)
        if status.failed:
            native.seek(0)
            tail = native.read().decode("utf-8", "replace").splitlines()[-NATIVE_TAIL_LINES:]
            if tail:
                print("backend output (last lines):\n  " + "\n  ".join(tail), file=sys.stderr)
        native.close()
