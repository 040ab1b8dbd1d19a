"""Stopping a benchmark run cleanly: SIGINT (Ctrl-C) and SIGTERM become `Stopped`, so the run can print and
save what finished before it exits."""
from __future__ import annotations

import contextlib
import signal


class Stopped(Exception):
    """The run was asked to stop; ``signame`` says by which signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signame}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM raise `Stopped` (once: a second signal acts as usual)."""
    def handler(signum, frame):
        for sig, old in previous.items():
            signal.signal(sig, old)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
