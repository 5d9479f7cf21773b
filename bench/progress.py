"""A one-line progress bar on stderr for the long steps; plain result lines on stdout.

On a terminal the bar is redrawn in place every 0.2 s while a step runs; when
stderr is not a terminal (CI, a pipe) nothing is drawn and only the result
lines appear, each prefixed with its step number, which is progress enough.
"""

from __future__ import annotations

import asyncio
import sys
import time

WIDTH = 24


class Progress:
    def __init__(self, steps: int, stream=None):
        self.steps = steps
        self.step = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._drawn = False

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def say(self, text: str) -> None:
        """A line of output that stays (the bar, if any, is redrawn below it)."""
        self._clear()
        print(text, flush=True)

    def begin(self) -> str:
        """Count one more step; the prefix for its lines, e.g. `[ 3/20]`."""
        self.step += 1
        width = len(str(self.steps))
        return f"[{self.step:{width}}/{self.steps}]"

    async def watch(self, label: str, seconds: float, done=None, total: int = 0, unit: str = "") -> None:
        """Redraw the bar until cancelled: elapsed time against `seconds`, `done()` against `total`."""
        if not self.tty:
            return
        t0 = time.monotonic()
        try:
            while True:
                elapsed = time.monotonic() - t0
                frac = elapsed / seconds if seconds > 0 else 0.0
                count = ""
                if done is not None and total:
                    n = done()
                    frac = max(frac, n / total)
                    count = f"  {n:,}/{total:,} {unit}"
                frac = min(1.0, frac)
                fill = int(frac * WIDTH)
                total_elapsed = time.monotonic() - self.started
                line = (f"{label}  [{'#' * fill}{'.' * (WIDTH - fill)}] {frac:4.0%}{count}"
                        f"  {elapsed:4.1f}/{seconds:.0f} s  (total {total_elapsed:4.0f} s)")
                self.stream.write("\r\033[K" + line[:200])
                self.stream.flush()
                self._drawn = True
                await asyncio.sleep(0.2)
        finally:
            self._clear()
