"""What every command shares: exit codes, error printing, quiet backends, stage timings.

A user error (`QuantNpuError`: bad input, a graph quantnpu does not support) is one line on stderr,
exit 2. Anything else is a bug in quantnpu: its traceback, then one line naming where it happened,
exit 70. Ctrl-C exits 130 and leaves no partial file.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable

from quantnpu.errors import InternalError, Interrupted, QuantNpuError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE
EXIT_INTERRUPTED = 130


class Stages:
    """Prints `[stage] ... seconds` lines and keeps each stage's seconds, peak resident memory
    (MiB, quantnpu.memory.peak_memory) and the resident memory left when it ended (what the next
    stages start from) for the run record."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}
        self.resident_after_mib: dict[str, float] = {}

    def run(self, name: str, work: Callable):
        from quantnpu.memory import peak_memory, resident_mib

        if not self.quiet:
            print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        with peak_memory() as peak:
            result = work()
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.peak_mib[name] = peak.mib
        self.resident_after_mib[name] = resident_mib()
        if not self.quiet:
            print(f"[{name}] done in {self.seconds[name]:.1f} s, peak {peak.mib / 1024:.2f} GiB resident "
                  f"({self.resident_after_mib[name] / 1024:.2f} GiB after)", flush=True)
        return result


def report_internal_error(error: BaseException) -> None:
    """The traceback, then one line saying it is quantnpu's bug and where it happened."""
    traceback.print_exception(error, file=sys.stderr)
    where = f" in pass {error.pass_name}" if isinstance(error, InternalError) else ""
    cause = error.cause if isinstance(error, InternalError) else error
    print(f"internal error{where}: {type(cause).__name__}: {cause} -- a bug in quantnpu, not in the input; "
          "the traceback is above (please report it)", file=sys.stderr)


def guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return run(args)
    except Interrupted as error:
        print(f"\n{error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except QuantNpuError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 -- everything else is ours: say so, with the traceback
        report_internal_error(error)
        return EXIT_INTERNAL_ERROR


def run_quietly(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run` with backend output kept quiet unless `--verbose` (quantnpu/logs.py)."""
    from quantnpu.logs import quiet_backends

    with quiet_backends(verbose=args.verbose) as status:
        code = guarded(run, args)
        status.failed = code != 0
    return code


def check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise QuantNpuError(f"{name} must be a positive number, got {value}")
