"""The command line: `quantnpu lower|export|report|generate` (also `quantnpu-lower`, `quantnpu-export`,
tools/lower.py, tools/export.py). One module per command; `common` holds exit codes and error
printing (a user error is one line, exit 2; a bug in quantnpu is its traceback, exit 70)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from quantnpu.cli.export import export_main
from quantnpu.cli.generate import generate_main
from quantnpu.cli.lower import main
from quantnpu.cli.report import report_main

__all__ = ["export_main", "generate_main", "main", "quantnpu_main", "report_main"]


def quantnpu_main(argv: Sequence[str] | None = None) -> int:
    """`quantnpu lower|export|report|generate ...`: the package's commands under one name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"lower": main, "export": export_main, "report": report_main, "generate": generate_main}
    if not argv or argv[0] not in commands:
        print(f"usage: quantnpu {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
