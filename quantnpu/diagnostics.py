"""Warnings quantnpu gives a user: the compiler went on, but something is weaker than it should be.

Errors stop a run (`quantnpu.errors`); a `QuantNpuWarning` is for a result that is still correct
but costs something (accuracy, a check's strength). Its message names the node or op and says what
it costs, so nothing weakens silently. Python's `warnings` machinery carries it: shown on stderr
once per message, and `-W error::quantnpu.diagnostics.QuantNpuWarning` (or pytest's
`filterwarnings`) turns it into an error.
"""

from __future__ import annotations

import warnings


class QuantNpuWarning(UserWarning):
    """A compile went on with something weaker than it should be; the message says what and where."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Issue a `QuantNpuWarning` attributed to the caller's caller (`stacklevel` as in `warnings.warn`, counted from the caller)."""
    warnings.warn(message, QuantNpuWarning, stacklevel=stacklevel + 1)
