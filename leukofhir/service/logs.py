"""Logs a hostile request can neither forge nor flood: control characters escaped and long lines cut in every record,
and refused requests summarised, one line per interval with their count."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter

# C0 and C1 controls (CR, LF, ESC of ANSI sequences, NUL, ...), DEL, the Unicode line and paragraph separators and
# the bidirectional overrides: each could start a forged line or hide text in a terminal or a log viewer.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_MESSAGE = 2000


def escape_controls(text: str, keep_newlines: bool = False) -> str:
    def escape(match: re.Match) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _CONTROL.sub(escape, text)


def cut(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class SafeRecords(logging.Filter):
    """On a handler: every record it writes becomes one line of at most MAX_MESSAGE characters, with control
    characters escaped; a traceback keeps its lines, each indented so that none can pass for a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: logging reports it as it would
            return True
        record.msg = cut(escape_controls(message))
        record.args = None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = "\n".join("    " + line for line in escape_controls(text, True).splitlines())
        return True


def guard_log_handlers(logger: logging.Logger | None = None) -> None:
    """Put SafeRecords on every handler of `logger` (the root logger: the one the command line configured, which
    uvicorn's loggers reach too when it is given no logging configuration of its own)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, SafeRecords) for f in handler.filters):
            handler.addFilter(SafeRecords())


class Refusals:
    """Refused requests and connections, logged without flooding: in each interval the first refusal of each kind
    (status) is logged in full, the others are counted, and their count is one line when the interval ends."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock=time.monotonic):
        self.log, self.interval, self._clock = logger, interval, clock
        self._lock = threading.Lock()
        self._window_start: float | None = None
        self._seen: set[str] = set()
        self._counted: Counter[str] = Counter()
        self._timer: threading.Timer | None = None
        self.total = 0

    def refused(self, kind: int | str, what: str, why: str) -> None:
        """One refusal: `kind` is its status, `what` the request or connection refused, `why` the reason."""
        kind = str(kind)
        with self._lock:
            self.total += 1
            now = self._clock()
            if self._window_start is None or now - self._window_start >= self.interval:
                self._flush_locked()
                self._window_start = now
            if kind not in self._seen:
                self._seen.add(kind)
                self.log.warning("refused %s: %s (%s)", what, why, kind)
                return
            self._counted[kind] += 1
            if self._timer is None:  # the count is logged even if no other refusal comes to flush it
                self._timer = threading.Timer(self._window_start + self.interval - now, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            count = sum(self._counted.values())
            kinds = ", ".join(f"{kind} ×{n}" for kind, n in sorted(self._counted.items()))
            self.log.warning("refused %d more in the last %g s (%s)", count, self.interval, kinds)
        self._counted.clear()
        self._seen.clear()
        self._window_start = None
