#!/usr/bin/env python3
"""tools/export.py [--model smollm2] [--seq-len 128] -o model.pt2"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantnpu.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
