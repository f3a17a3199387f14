"""`quantnpu report RECORD`: one HTML page about a run (quantnpu/report.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from quantnpu.cli.common import run_quietly
from quantnpu.errors import QuantNpuError


def _report(args: argparse.Namespace) -> int:
    from quantnpu.report import write_report

    if args.windows < 1:
        raise QuantNpuError(f"--windows must be positive, got {args.windows}")
    path = write_report(args.record, args.output, args.model, args.layer, args.windows)
    print(f"report: {path}")
    return 0


def report_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantnpu report", description="One HTML page about a run: figures, bit widths, ppl, timings.")
    parser.add_argument("record", help="the run record tools/lower.py wrote beside the .pte (.json)")
    parser.add_argument("-o", "--output", help="the page to write (default: beside the record, .html)")
    parser.add_argument("--model", help="the .pt2 for the activation figures (default: the record's model)")
    parser.add_argument("--layer", type=int, help="the layer of the activation figures (default: the most sensitive down_proj's)")
    parser.add_argument("--windows", type=int, default=1, help="evaluation windows for the activation figures")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own log lines")
    return run_quietly(_report, parser.parse_args(argv))
