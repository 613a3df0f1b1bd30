"""``prompter-worker run`` with a decoder that kills the process on a marker in the body.

A test-side launcher for the scenario of a message that crashes the worker every time it
is processed (a native crash, an out-of-memory kill): the production code has no crash
hook. Exits with :data:`EXIT_CODE` the moment a body holding :data:`MARKER` is decoded.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from worker import events
from worker.cli import main

MARKER = b"CRASH-THE-WORKER"
EXIT_CODE = 70

_decode = events.decode


def _crashing_decode(body: bytes, *args: Any, **kwargs: Any) -> object:
    if MARKER in body:
        os._exit(EXIT_CODE)
    return _decode(body, *args, **kwargs)


if __name__ == "__main__":
    # Only in the worker process: the test process imports this module for MARKER, and must
    # keep the real decoder.
    events.decode = _crashing_decode  # type: ignore[assignment]
    sys.exit(main(["run"]))
