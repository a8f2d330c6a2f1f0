"""Progress reporting that reads well both on a terminal and in a log file.

On a terminal (the output stream is a TTY) :func:`progress` is a plain ``tqdm`` bar. In a
log file or a pipe a redrawn bar becomes a stream of carriage-return frames (one "line" of
``make demo``'s captured output grew to 100 kB), so there it prints one plain line now and
then instead — when another ``PROGRESS_PERCENT`` % is done (but at most one such line per
``MIN_GAP_S`` seconds) or ``PROGRESS_SECONDS`` seconds have passed — and a closing line,
with the same numbers a bar shows: done/total, percentage, rate, elapsed and ETA.
``PROGRESS=bar|lines|off`` forces a style.

A slow loop is never silent in a log: its first line comes with the first unit done after
``FIRST_LINE_S`` seconds (so it already carries a rate and an ETA), and while one unit
takes longer than ``PROGRESS_SECONDS`` (a batch of minutes on a slow machine) a line
saying so is printed every ``PROGRESS_SECONDS``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from typing import Any

from tqdm import tqdm

MIN_GAP_S = 5.0  # fast loops print their closing line only
FIRST_LINE_S = 5.0  # a loop this slow prints its first line at its first finished unit


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class _NullFile:
    """Swallows tqdm's own frames; :class:`LineProgress` writes its lines itself."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class LineProgress(tqdm):
    """A ``tqdm`` (same API: ``update``, ``set_postfix``, ``format_dict`` ...) that prints
    plain lines instead of redrawing a bar."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._out = kwargs.pop("file", None) or sys.stderr
        self._every_pct = _env_float("PROGRESS_PERCENT", 10.0)
        self._every_s = _env_float("PROGRESS_SECONDS", 60.0)
        self._last_line_t: float | None = None
        self._last_line_n = kwargs.get("initial", 0)  # a resumed bar counts from ``initial``
        self._next_pct = self._every_pct
        for k in ("dynamic_ncols", "ncols", "position"):
            kwargs.pop(k, None)
        kwargs["file"] = _NullFile()
        self._line_lock = threading.RLock()
        self._closed = threading.Event()
        super().__init__(*args, **kwargs)
        if self.total:
            done = 100.0 * self.n / self.total
            self._next_pct = (int(done // self._every_pct) + 1) * self._every_pct
        if not self.disable and self._every_s > 0:
            # the thread holds the bar weakly: a bar dropped unclosed is collected (and closed) as before
            args = (weakref.ref(self), self._closed, self._every_s)
            threading.Thread(target=_heartbeat, args=args, name=f"progress:{self.desc}", daemon=True).start()

    def _beat(self) -> None:
        last = self._last_line_t if self._last_line_t is not None else getattr(self, "start_t", time.time())
        if time.time() - last >= self._every_s and not self._closed.is_set():
            self._emit(f"{self.unit} {self.n + 1:g} in progress")

    def line(self) -> str:
        """The current state as one line of text."""
        d = self.format_dict
        n, total, elapsed = d["n"], d["total"], d["elapsed"]
        unit, scale = d.get("unit") or "it", d.get("unit_scale")
        divisor = d.get("unit_divisor", 1000)

        def amount(x: float, digits: str = "g") -> str:
            return self.format_sizeof(x, divisor=divisor) if scale else format(x, digits)

        rate = d.get("rate") or ((n - d.get("initial", 0)) / elapsed if elapsed > 0 else None)
        parts = [f"{d.get('prefix') or 'progress'}: {amount(n)}" + (f"/{amount(total)}" if total else "") + f" {unit}"]
        if total:
            parts[0] += f" ({100.0 * n / total:.0f}%)"
        if rate:
            parts.append(f"{amount(rate, '.3g')} {unit}/s")
        parts.append(f"elapsed {self.format_interval(elapsed)}")
        if total and rate and n < total:
            parts.append(f"ETA {self.format_interval((total - n) / rate)}")
        if d.get("postfix"):
            parts.append(str(d["postfix"]))
        return ", ".join(parts)

    def _emit(self, note: str = "") -> None:
        with self._line_lock:
            try:
                self._out.write(self.line() + (f", {note}" if note else "") + "\n")
                self._out.flush()
            except (ValueError, OSError):  # the stream was closed under us (a bar collected at exit)
                pass
            self._last_line_t = time.time()
            self._last_line_n = self.n

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # tqdm calls this on start, on (throttled) updates and on close; decide here
        now = time.time()
        if self.n == self._last_line_n:
            return True
        since = now - (self._last_line_t if self._last_line_t is not None else getattr(self, "start_t", now))
        due = since >= self._every_s or (self._last_line_t is None and since >= FIRST_LINE_S)
        if self.total and 100.0 * self.n / self.total >= self._next_pct:
            done = 100.0 * self.n / self.total
            self._next_pct = (int(done // self._every_pct) + 1) * self._every_pct
            due = due or since >= MIN_GAP_S
        if due:
            self._emit()
        return True

    def close(self) -> None:
        closed = getattr(self, "_closed", None)
        if closed is not None:
            closed.set()
        if not self.disable and self.n != self._last_line_n:
            self._emit()  # the closing line: totals, rate and elapsed time
        super().close()


def _heartbeat(ref: weakref.ref, closed: threading.Event, every_s: float) -> None:
    """A line every ``every_s`` seconds while the bar printed none (a unit that takes
    minutes), until the bar closes or is collected."""
    while not closed.wait(every_s):
        bar = ref()
        if bar is None:
            return
        bar._beat()
        del bar


def _style(stream: Any) -> str:
    forced = os.environ.get("PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal, :class:`LineProgress` elsewhere."""
    style = _style(kwargs.get("file") or sys.stderr)
    if style == "off":
        kwargs["disable"] = True
    if style == "bar":
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)
