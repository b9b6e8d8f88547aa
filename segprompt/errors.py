"""The one exception type the CLI turns into a clean message (no traceback)."""


class SegpromptError(Exception):
    """A user-facing error: the message names the file, key or value and says what to do."""


class DivergedError(SegpromptError):
    """Training met a non-finite loss: the run's settings (usually the learning rate) diverge.
    A learning-rate sweep records it as a diverged run rather than stopping."""
