"""Progress bars that suit where they are read: a live bar on a terminal or in a notebook, and plain lines (one per
update, at most every `PLAIN_INTERVAL` seconds) when stderr is piped to a file or another program, where a bar's
carriage returns would pile up into one unreadable line."""

from __future__ import annotations

import sys

PLAIN_INTERVAL = 10.0  # seconds between lines when not on a terminal


class _Lines:
    """A stream for tqdm that turns each in-place redraw into one line."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _in_notebook() -> bool:
    """Running inside a Jupyter kernel (not merely with IPython importable or imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def tqdm(*args, **kwargs):
    """`tqdm.auto.tqdm` on a terminal or in a notebook; otherwise a plain `tqdm` writing lines (`_Lines`)."""
    if sys.stderr.isatty() or _in_notebook():
        from tqdm.auto import tqdm as live

        return live(*args, **kwargs)
    from tqdm import tqdm as plain

    kwargs.setdefault("file", _Lines(sys.stderr))
    kwargs.setdefault("mininterval", PLAIN_INTERVAL)
    kwargs.setdefault("ascii", True)
    kwargs.setdefault("dynamic_ncols", False)
    return plain(*args, **kwargs)
