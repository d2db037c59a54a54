"""Progress of long loops: a tqdm bar on a terminal, plain periodic lines anywhere else.

A tqdm bar redraws one terminal line; in a log file, a pipe, under `nohup` or CI it is either
hidden (`disable=None`) or a stream of carriage returns. `progress_bar` gives the bar on a terminal
(a widget in a notebook, `tqdm.auto`) and otherwise a `PlainProgress`: one line every 10 % of the
total (every `PLAIN_EVERY_S` without a total, or when 10 % takes longer), each with the step, the
total, the rate and the time left.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

PLAIN_EVERY_S = 60.0  # the longest gap between two plain lines


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PlainProgress(tqdm):
    """A tqdm whose display is a full line at each 10 % of the total or after `PLAIN_EVERY_S`, never a redraw."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._decile, self._printed_at = None, 0.0  # tqdm's __init__ displays once: set before it
        super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})  # every update reaches display()
        self.sp = None  # nothing to clear on close (tqdm's terminal clean-up would write to the log)

    def line(self) -> str:
        """desc: n/total unit (pct), rate unit/s, ETA (and the postfix, e.g. the loss)."""
        d = self.format_dict
        done = d["n"] - d["initial"]
        rate = done / d["elapsed"] if d["elapsed"] > 0 and done > 0 else None
        total = f"/{d['total']}" if d["total"] else ""
        pct = f" ({100 * d['n'] / d['total']:.0f}%)" if d["total"] else ""
        speed = f", {rate:.3g} {d['unit']}/s" if rate and rate < 1000 else f", {rate:.0f} {d['unit']}/s" if rate else ""
        eta = f", ETA {_duration((d['total'] - d['n']) / rate)}" if rate and d["total"] else ""
        postfix = f", {d['postfix']}" if d["postfix"] else ""
        desc = (d["prefix"] or "progress").removesuffix(": ")  # set_description() appends ": "
        return f"{desc}: {d['n']}{total} {d['unit']}{pct}{speed}{eta}{postfix}"

    def clear(self, nolock: bool = False) -> None:
        """Nothing to erase: a printed line stays. (`tqdm.write` clears every open bar first, so two
        runs' bars at once, `study.parallel = 2`, reach here.)"""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        decile = int(10 * self.n / self.total) if self.total else None
        now = self._time()
        if self._decile is None:  # the first display: the starting point, not printed
            self._decile, self._printed_at = decile, now
            return False
        if (decile is not None and decile > self._decile) or now - self._printed_at >= PLAIN_EVERY_S:
            self._decile, self._printed_at = decile, now
            self.fp.write(self.line() + "\n")
            self.fp.flush()
        return False


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """`tqdm.auto.tqdm(iterable, **kwargs)` on a terminal or in a notebook; a `PlainProgress` when its file
    (stderr by default) is neither. `disable=True` turns both off; `disable=None` no longer hides the
    progress off a terminal."""
    file = kwargs.get("file") or sys.stderr
    notebook = "tqdm.notebook" in sys.modules  # imported by tqdm.auto only inside a notebook
    if kwargs.get("disable") or notebook or (hasattr(file, "isatty") and file.isatty()):
        return auto_tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **{**kwargs, "disable": False})
