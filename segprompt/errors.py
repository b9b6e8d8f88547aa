"""The one exception type the CLI turns into a clean message (no traceback)."""


class SegpromptError(Exception):
    """A user-facing error: the message names the file, key or value and says what to do."""
