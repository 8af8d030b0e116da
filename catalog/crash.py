"""Named crash points for the kill tests: `CIRCUIT_CATALOG_CRASH_AT=part:3` SIGKILLs the process the
third time it reaches the point `part`; `part:3:STOP` stops it there instead (SIGSTOP), holding
whatever it holds, so a test can look at the catalog and run other commands mid-write.

With `CIRCUIT_CATALOG_CRASH_ONCE=PATH` as well, only the first process to reach the point dies there: it
creates PATH as it dies, and a process that finds PATH there goes on. Ray's workers each count for themselves
and a killed task runs again in another worker, so this is how a test kills one worker once, not every retry.

Timed kills land wherever the clock says; a named point reproduces the same half-written state on
every run, so each resume path (a part written but not recorded, a temporary left behind, a store
half-built) is tested every time. Unset, a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CIRCUIT_CATALOG_CRASH_AT"
ONCE_ENV = "CIRCUIT_CATALOG_CRASH_ONCE"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    _reached[name] += 1
    point, _, how = target.partition(":")
    count, _, sig = how.partition(":")
    if point == name and count == str(_reached[name]):
        if once := os.environ.get(ONCE_ENV):
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGSTOP if sig == "STOP" else signal.SIGKILL)
