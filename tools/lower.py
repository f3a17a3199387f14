#!/usr/bin/env python3
"""tools/lower.py model.pt2 [-o out.pte] [--quant CONFIG] [--soc SM8650] [--calib-windows N] [--eval]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantnpu.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
