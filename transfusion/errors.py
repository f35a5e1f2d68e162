"""How an exception is told in one line (a run's failure tag, a log line, a CLI error)."""

from __future__ import annotations

REASON_LIMIT = 500


def first_line(exc: BaseException, *, limit: int = REASON_LIMIT) -> str:
    """``Type: message`` up to the message's first line break, at most ``limit`` characters."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:limit]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM asked this process to stop: every handler of KeyboardInterrupt sees it."""

    def __init__(self, signum: int, *, delivered: bool = True) -> None:
        import signal

        self.signum = signum
        # False: a KeyboardInterrupt raised by code, not by a signal this process received.
        self.delivered = delivered
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum
