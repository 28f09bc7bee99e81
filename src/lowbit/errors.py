"""The one exception type users see: its message is a single line saying what is wrong and what to do."""


class LowbitError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits non-zero."""


def warn(message: str) -> None:
    """A warning the user needs, one line on stderr (`warning: ...`), printed whatever else is quiet."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)
