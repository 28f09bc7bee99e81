"""The one exception type users see: its message is a single line saying what is wrong and what to do."""


class LowbitError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits non-zero."""
