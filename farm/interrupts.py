"""Ctrl-C that reaches the command even while Ray holds the main thread.

Python runs a SIGINT handler between bytecodes; while the main thread waits inside Ray's C++ (a
``ray.get``), Ray checks for signals itself and turns the KeyboardInterrupt into a status, which
some of its paths drop: the Ctrl-C is lost and ``farm submit`` follows the job to its end. The
command's handler therefore also remembers the signal, and every loop that follows a job asks
``raise_if_interrupted`` between polls. Without ``install`` (farm used as a library) it is a no-op.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_received = threading.Event()


def install() -> None:
    """Make Ctrl-C raise KeyboardInterrupt, as Python's default does, and be remembered (only
    the main thread may set a handler: elsewhere, e.g. the command run in a test's thread, this
    does nothing)."""
    _received.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum: int, frame: Any) -> None:
    _received.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that came (and may have been swallowed)."""
    if _received.is_set():
        raise KeyboardInterrupt
