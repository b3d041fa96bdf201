"""The one grammar for durations and times, shared by the manifest's ``deadline:`` and the CLI's
``--since``/``--until``.

- A duration: a number of seconds (``3600``, ``90.5``) or amounts with units ``s m h d``, one
  or several (``90m``, ``6h``, ``1h30m``, ``2d 12h``).
- A time: ISO 8601 (``2027-03-01T09:00:00+01:00``, ``2026-11-25T08:00``, ``2026-11-25``).

Pure: ``now`` is always passed in.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta, tzinfo

_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AMOUNT = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_DURATION = re.compile(r"^(?:\s*\d+(?:\.\d+)?\s*[smhd])+\s*$")
EXAMPLES = "6h, 90m, 1h30m, 3600 or 2027-03-01T09:00:00+01:00"


def parse_duration(value: str | float) -> float | None:
    """Seconds of a duration, or None if ``value`` is not written as one. Raises ValueError for a
    number that is not finite."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION.match(text):
                return None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in _AMOUNT.findall(text))
    if not math.isfinite(seconds):
        raise ValueError(f"{value} is not a number of seconds: give e.g. {EXAMPLES}")
    return seconds


def parse_time(value: str | float | date, *, naive_zone: tzinfo | None = None) -> datetime:
    """A time. Without a zone it is in ``naive_zone`` (a tzinfo); with ``naive_zone`` None a time
    without a zone is an error. Raises ValueError with what to write instead."""
    if isinstance(value, datetime):
        at = value
    elif isinstance(value, date):  # YAML reads an unquoted 2027-03-01 as a date
        at = datetime(value.year, value.month, value.day)
    else:
        try:
            at = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ValueError(f"{value!r} is neither a duration nor a time: write e.g. {EXAMPLES}") from None
    if at.tzinfo is None:
        if naive_zone is None:
            raise ValueError(f"{value!r} has no time zone: add one, e.g. {at.isoformat()}+00:00")
        at = at.replace(tzinfo=naive_zone)
    return at


def time_ahead(value: str | float | date, now: datetime) -> datetime:
    """A deadline: a duration from ``now``, or a time with its zone."""
    seconds = parse_duration(value) if not isinstance(value, date) else None
    return now + timedelta(seconds=seconds) if seconds is not None else parse_time(value, naive_zone=None)


def time_ago(value: str, now: datetime) -> datetime:
    """A filter bound (--since/--until): an age before ``now``, or a time (UTC unless it says)."""
    seconds = parse_duration(value)
    return now - timedelta(seconds=seconds) if seconds is not None else parse_time(value, naive_zone=UTC)


class Deadline:
    """A manifest's ``deadline:``, parsed once: a duration from submission, or a fixed time (which
    may have passed: re-submitting a late campaign to resume it must still work)."""

    __slots__ = ("after_s", "fixed")

    def __init__(self, after_s: float | None = None, fixed: datetime | None = None) -> None:
        self.after_s = after_s
        self.fixed = fixed

    @classmethod
    def parse(cls, value: str | float | date, max_s: float) -> Deadline:
        """Raises ValueError saying what to write instead."""
        seconds = parse_duration(value) if not isinstance(value, date) else None
        if seconds is None:
            return cls(fixed=parse_time(value, naive_zone=None))
        if seconds <= 0:
            raise ValueError("must be positive: give a duration such as 6h or a future time")
        if seconds > max_s:
            raise ValueError(
                f"{value} is more than a year: give a shorter duration, or a time such as 2027-03-01T09:00:00+01:00"
            )
        return cls(after_s=seconds)

    def due(self, submitted_at: datetime) -> datetime:
        return self.fixed if self.fixed is not None else submitted_at + timedelta(seconds=self.after_s or 0.0)

    def seconds_left(self, now: datetime, submitted_at: datetime | None = None) -> float:
        return (self.due(submitted_at or now) - now).total_seconds()

    def __repr__(self) -> str:
        return f"Deadline({self.fixed.isoformat() if self.fixed else f'{self.after_s:g}s'})"
