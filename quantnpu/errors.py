"""User-facing errors: each one is printed as a single line by the command-line tools.

`InternalError` is the other kind: not the user's input but a bug in quantnpu, raised with the
original exception chained, and printed by the command-line tools with its traceback."""


class QuantNpuError(Exception):
    """Base class of every error quantnpu reports to a user (no traceback needed)."""


class GraphStructureError(QuantNpuError):
    """The graph does not have the structure a pass needs; the message names the node."""

    def __init__(self, message: str, node_name: str | None = None) -> None:
        self.node_name = node_name
        super().__init__(f"node %{node_name}: {message}" if node_name else message)


class PassFailedError(QuantNpuError):
    """A pass raised, or its pre/postcondition did not hold; names the pass and the node."""

    def __init__(self, pass_name: str, cause: BaseException) -> None:
        self.pass_name = pass_name
        self.cause = cause
        super().__init__(f"pass {pass_name} failed: {cause}")


class InputFileError(QuantNpuError):
    """A file given by the user is missing, of the wrong kind, or damaged."""


class QnnSetupError(QuantNpuError):
    """The QNN libraries are missing or cannot be prepared."""


class DelegationError(QuantNpuError):
    """Compute was left outside the QNN delegates of a lowered program."""


class FunctionChangedError(QuantNpuError):
    """A rewrite that should keep the function changed it (the verifier's finding)."""


class Interrupted(QuantNpuError):
    """A long job stopped on the user's Ctrl-C after saving what it had; the message says how to go on."""


class InternalError(Exception):
    """A pass raised something that is not a `QuantNpuError`: a bug in quantnpu, not bad input.
    Names the pass; the original exception is `cause` (and `__cause__`, with its traceback)."""

    def __init__(self, pass_name: str, cause: BaseException) -> None:
        self.pass_name = pass_name
        self.cause = cause
        super().__init__(f"internal error in pass {pass_name}: {type(cause).__name__}: {cause}")
