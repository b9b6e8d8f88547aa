"""The exceptions the CLI turns into one clear line and an exit status (no traceback)."""


class SegpromptError(Exception):
    """A user-facing error: the message names the file, key or value and says what to do."""


class RunInterrupted(BaseException):
    """Training stopped on SIGINT/SIGTERM at an iteration boundary; the message says how to resume.

    Not an ``Exception`` (as ``KeyboardInterrupt`` is not), so code that carries on after a failed
    run, such as ``segprompt ablate``, stops. The CLI exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, signum)
        self.message, self.signum = message, signum

    def __str__(self) -> str:
        return self.message


class RunCrashed(Exception):
    """A run died of an unexpected exception (a bug) whose traceback is already in its train.log."""
