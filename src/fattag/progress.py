"""Progress reporting that suits both a terminal and a log file.

On a terminal (stderr is a TTY) `progress` draws a tqdm bar. Anywhere else (Kaggle kernel logs,
`nohup`, CI) tqdm's carriage-return redraws turn into floods of half-lines, so it writes plain
lines instead, at most one every `interval` seconds plus a final one:

    decode train_noisy: 5000/19815 clips (25%) 130.2 clips/s, eta 1m54s, MB/s=12.1
    decode train_noisy: 19815/19815 clips (100%) in 2m32s, 130.4 clips/s, MB/s=12.3

The lines go through the `fattag` logger when the package's logging is set up (it then carries
handlers, see `context.setup_logging`), and straight to stderr otherwise, so that progress is never
silently dropped by an unconfigured logger.
"""
from __future__ import annotations

import logging
import math
import sys
import time

__all__ = ["Progress", "fmt_seconds", "progress"]

log = logging.getLogger("fattag")

DEFAULT_INTERVAL = 30.0


def fmt_seconds(s) -> str:
    """A short human duration: '12.3s', '3m05s', '1h02m' ('?' for None, NaN or negative)."""
    if s is None:
        return "?"
    s = float(s)
    if not math.isfinite(s) or s < 0:
        return "?"
    if round(s, 1) < 60:
        return f"{s:.1f}s"
    whole = int(round(s))
    if whole < 3600:
        m, sec = divmod(whole, 60)
        return f"{m}m{sec:02d}s"
    h, m = divmod(int(round(s / 60)), 60)
    return f"{h}h{m:02d}m"


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _plural(unit: str) -> str:
    if unit == "it" or unit.endswith("s"):
        return unit
    return unit + ("es" if unit.endswith(("x", "sh", "tch")) else "s")


class Progress:
    """Iterable progress tracker; `set_postfix(**kw)` adds `k=v` fields to the lines (and the bar).

    Use it as `for x in progress(items, ...)`, or without an iterable through `update(n)` and
    `close()` (also a context manager). `close()` writes the final line once; it runs by itself
    when the iteration ends or is abandoned.
    """

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", interval=None,
                 disable: bool = False, tty: bool | None = None):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.interval = DEFAULT_INTERVAL if interval is None else float(interval)
        self.disable = disable
        self.n = 0
        self.postfix: dict = {}
        self.closed = False
        self.start = self._last = time.perf_counter()
        self._bar = None
        if not disable and (_stderr_is_tty() if tty is None else tty):
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc or None, unit=unit, file=sys.stderr, dynamic_ncols=True)

    # ---- counting ----
    def __iter__(self):
        if self.iterable is None:
            raise TypeError("this Progress has no iterable; use update() and close()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("Progress of unknown total has no len()")
        return int(self.total)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self.closed:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.total is not None and self.n >= self.total:
            return  # the final line, written by close(), follows
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(self.line())

    def set_postfix(self, **kw) -> None:
        """Fields shown after the rate, e.g. `set_postfix(**{"MB/s": "12.3", "skipped": 2})`."""
        self.postfix.update(kw)
        if self._bar is not None:
            self._bar.set_postfix(ordered_dict={k: v for k, v in self.postfix.items()}, refresh=False)

    def close(self) -> None:
        """Finish: close the bar, or write the final plain line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.disable:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._emit(self.line(final=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- plain lines ----
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self, final: bool = False) -> str:
        """The plain-text status: counts, percent, rate, eta (or total time when final), postfix."""
        elapsed = self.elapsed()
        rate = self.n / elapsed if elapsed > 0 else 0.0
        units = _plural(self.unit)
        if self.total:
            count = f"{self.n}/{self.total} {units} ({100.0 * self.n / self.total:.0f}%)"
        else:
            count = f"{self.n} {units}"
        if final:
            stopped = self.total is not None and self.n < self.total
            parts = [f"{'stopped at ' if stopped else ''}{count} in {fmt_seconds(elapsed)}", f"{rate:.1f} {units}/s"]
        else:
            parts = [f"{count} {rate:.1f} {units}/s"]
            if self.total and rate > 0:
                parts.append(f"eta {fmt_seconds((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        text = ", ".join(parts)
        return f"{self.desc}: {text}" if self.desc else text

    @staticmethod
    def _emit(line: str) -> None:
        line = line.replace("\r", " ")
        if log.handlers:  # the package's logging is configured: one log line
            log.info(line)
        else:             # nobody set up logging: stderr, so the line is not lost
            print(line, file=sys.stderr, flush=True)


def progress(iterable=None, total=None, desc: str = "", unit: str = "it", interval=None,
             disable: bool = False) -> Progress:
    """Wrap `iterable` with a tqdm bar on a TTY or plain throttled lines elsewhere; see `Progress`.

    `interval` is the least number of seconds between plain lines (default 30); a final line is
    always written. `disable=True` counts silently.
    """
    return Progress(iterable, total=total, desc=desc, unit=unit, interval=interval, disable=disable)
