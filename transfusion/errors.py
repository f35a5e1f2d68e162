"""How an exception is told in one line (a run's failure tag, a log line, a CLI error)."""

from __future__ import annotations

REASON_LIMIT = 500


def first_line(exc: BaseException, *, limit: int = REASON_LIMIT) -> str:
    """``Type: message`` up to the message's first line break, at most ``limit`` characters."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:limit]
