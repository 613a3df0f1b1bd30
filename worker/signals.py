"""Signal handling for the long-running commands, installed for a scope and then undone."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def handle_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """Call ``handler(signum)`` on SIGTERM and SIGINT for the duration, in the running loop;
    the previous handlers come back afterwards. Outside the main thread (where signals
    cannot be caught) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in sigs}
    for sig in sigs:
        loop.add_signal_handler(sig, handler, int(sig))
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)  # sets the default disposition...
            if previous[sig] is not None:  # ...so the one found before comes back
                signal.signal(sig, previous[sig])
