"""The two exceptions a user can cause; the CLI maps them to exit codes."""


class OnnxShrinkError(Exception):
    """Bad input or a run that cannot go on (CLI exit code 1).

    The message is one line that names the thing at fault and what to do.
    """

    exit_code = 1


class UsageError(OnnxShrinkError):
    """A mistake in how onnxshrink was called: unknown pass, option or value (exit code 2)."""

    exit_code = 2
