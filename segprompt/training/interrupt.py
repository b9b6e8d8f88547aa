"""SIGINT (Ctrl-C) and SIGTERM (what Slurm sends before a kill) during training.

The handler only records the signal; it never touches the model or a file. The training loop asks
:meth:`StopSignal.received` at the top of every iteration, saves ``last.pt`` there and stops
(segprompt/training/loop.py). Under DDP every rank asks at every iteration and the answer is
reduced over ranks, so all of them stop at the same iteration even when one alone got the signal,
and rank 0's save finds every rank in its collectives. After the first signal SIGINT has its
default action again: a second Ctrl-C ends the process at once, without saving (docs/runs.md).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch

from segprompt import distributed as dist_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """Context manager: installs the handlers (main thread only) and restores the previous ones."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.signum = 0  # the first signal received, 0 if none
        self.who = f"segprompt (rank {rank})" if world_size > 1 else "segprompt"
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.signum
        self.signum = self.signum or signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if first:  # os.write: no lock that the interrupted code might hold
            again = "Ctrl-C again" if signum == signal.SIGINT else "Ctrl-C (SIGINT) or SIGKILL"
            lead = "\n" if os.isatty(2) else ""  # on a terminal, off the progress bar's line
            os.write(2, f"{lead}{self.who}: {signal.Signals(signum).name} received; stopping at the next iteration "
                        f"boundary, after saving checkpoints/last.pt ({again} quits at once, without "
                        f"saving)\n".encode())

    def received(self, device: torch.device) -> int:
        """The signal any rank received (the largest number), or 0; every rank must call it."""
        return dist_utils.all_reduce_max(self.signum, device)
