"""The one exception type users see: its message is a single line saying what is wrong and what to do. And the
two kinds of line lowbit prints on stderr: warnings, and progress that --quiet silences."""

import sys


class LowbitError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits non-zero."""


def warn(message: str) -> None:
    """A warning the user needs, one line on stderr (`warning: ...`), printed whatever else is quiet."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def log(msg: str, quiet: bool = False) -> None:
    """A progress line on stderr (stdout stays free for --json); nothing when quiet."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
