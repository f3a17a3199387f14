"""`python -m quantnpu lower|export|report ...`"""

import sys

from quantnpu.cli import quantnpu_main

sys.exit(quantnpu_main())
