"""Numbers and times as the one command prints them."""

from __future__ import annotations

import time


def fmt(value) -> str:
    """A metric to 4 decimals, or "?"."""
    return f"{value:.4f}" if isinstance(value, float | int) else "?"


def clock_time(at) -> str:
    """A log line's epoch time as the local HH:MM:SS, or "?"."""
    return time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, float) else "?"


def mmss(seconds: float) -> str:
    """Seconds as M:SS ("?:??" for NaN)."""
    if seconds != seconds:  # NaN
        return "?:??"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
