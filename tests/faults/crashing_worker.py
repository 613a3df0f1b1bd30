"""``prompter-worker run`` with a decoder that kills the process on a marker in the body.

A test-side launcher for the scenario of a message that crashes the worker every time it
is processed (a native crash, an out-of-memory kill): the production code has no crash
hook. Exits with :data:`EXIT_CODE` the moment a body holding :data:`MARKER` is decoded.
"""

from __future__ import annotations

import os
import sys

from worker import events
from worker.cli import main

MARKER = b"CRASH-THE-WORKER"
EXIT_CODE = 70

_decode = events.decode


def _crashing_decode(body: bytes, max_bytes: int = events.DEFAULT_MAX_EVENT_BYTES) -> object:
    if MARKER in body:
        os._exit(EXIT_CODE)
    return _decode(body, max_bytes)


events.decode = _crashing_decode  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(["run"]))
