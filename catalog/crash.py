"""Named crash points for the kill tests: `CIRCUIT_CATALOG_CRASH_AT=part:3` SIGKILLs the process the
third time it reaches the point `part`; `part:3:STOP` stops it there instead (SIGSTOP), holding
whatever it holds, so a test can look at the catalog and run other commands mid-write.

Timed kills land wherever the clock says; a named point reproduces the same half-written state on
every run, so each resume path (a part written but not recorded, a temporary left behind, a store
half-built) is tested every time. Unset, a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CIRCUIT_CATALOG_CRASH_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    _reached[name] += 1
    point, _, how = target.partition(":")
    count, _, sig = how.partition(":")
    if point == name and count == str(_reached[name]):
        os.kill(os.getpid(), signal.SIGSTOP if sig == "STOP" else signal.SIGKILL)
