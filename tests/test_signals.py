"""worker.signals: handlers installed for a scope, undone afterwards; a no-op off the main
thread, where signals cannot be caught."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

from worker.signals import handle_signals


async def test_handlers_run_in_the_loop_and_are_removed_afterwards() -> None:
    got: list[int] = []
    arrived = asyncio.Event()

    def handler(signum: int) -> None:
        got.append(signum)
        arrived.set()

    loop = asyncio.get_running_loop()
    before = signal.getsignal(signal.SIGINT)  # asyncio.run's own, here
    with handle_signals(handler):
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(arrived.wait(), 10)
    assert got == [signal.SIGTERM]
    assert loop.remove_signal_handler(signal.SIGTERM) is False  # nothing left installed
    assert loop.remove_signal_handler(signal.SIGINT) is False
    assert signal.getsignal(signal.SIGINT) is before  # not the default: the one found


def test_outside_the_main_thread_nothing_is_installed() -> None:
    outcome: list[object] = []

    async def scoped() -> None:
        with handle_signals(outcome.append):
            outcome.append("inside")

    def in_thread() -> None:
        try:
            asyncio.run(scoped())
        except BaseException as exc:  # recorded for the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    assert outcome == ["inside"]


async def test_a_custom_handler_found_before_comes_back() -> None:
    """A handler the application had installed (say a service embedding the publisher's
    replay) is in place again once the scope ends, for both signals."""
    calls: list[int] = []

    def custom(signum: int, frame: object) -> None:
        calls.append(signum)

    before = {sig: signal.signal(sig, custom) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with handle_signals(lambda _: None):
            pass
        assert signal.getsignal(signal.SIGTERM) is custom
        assert signal.getsignal(signal.SIGINT) is custom
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
