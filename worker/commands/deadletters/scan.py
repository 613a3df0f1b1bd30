"""Acting on a selection of dead letters (redrive or purge): each message looked at once,
the selected handed to an action with a bounded window, the rest held back untouched.

The prefetch count is a 16-bit number, so one run looks at most at :data:`MAX_HELD_BACK`
messages it does not take; a larger selection is redriven or purged by running the command
again. The first Ctrl-C (or SIGTERM) stops taking more, finishes the actions in flight and
reports what was moved; a second stops at once.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from worker.amqp import protocol as amqp
from worker.commands.deadletters.letters import DeadLetter, describe
from worker.commands.deadletters.reading import READ_CHANNEL, Reader, reading
from worker.config import Settings
from worker.signals import handle_signals

DEFAULT_WINDOW: Final = 256
#: Messages a run may hold back unacknowledged (the 16-bit prefetch, less the window).
MAX_HELD_BACK: Final = 60_000


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which dead letters to act on: those matching every given filter (none: all), at
    most ``limit`` of them. ``event_ids`` match a message's id or its key."""

    reasons: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()
    limit: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        if not self.event_ids:
            return True
        return (letter.event_id or "").lower() in self.event_ids or letter.key in self.event_ids


@dataclass(kw_only=True)
class RedriveReport:
    queue: str
    exchange: str
    redriven: list[DeadLetter] = field(default_factory=list)
    kept: int = 0  # looked at, not selected: back in the queue
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)  # back in the queue
    error: str | None = None
    interrupted: bool = False
    elapsed: float = 0.0
    purge: bool = False  # a selective purge: "redriven" were deleted

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "exchange": self.exchange,
            "purged" if self.purge else "redriven": len(self.redriven),
            "by_reason": dict(Counter(d.reason for d in self.redriven).most_common()),
            "kept": self.kept,
            "failed": [{**d.as_dict(), "error": e} for d, e in self.failed],
            "error": self.error,
            "interrupted": self.interrupted,
            "elapsed_seconds": round(self.elapsed, 3),
        }


def render_redrive(report: RedriveReport) -> str:
    lines = [f"{d.event_id or d.key}: {error}" for d, error in report.failed[:20]]
    if len(report.failed) > 20:
        lines.append(f"... and {len(report.failed) - 20:,} more failures")
    counts = Counter(d.reason for d in report.redriven).most_common()
    detail = f" ({', '.join(f'{r} {n:,}' for r, n in counts)})" if counts else ""
    rate = len(report.redriven) / report.elapsed if report.elapsed > 0 else 0.0
    if report.purge:
        lines.append(
            f"purged {len(report.redriven):,} messages{detail} from {report.queue}; "
            f"{report.kept:,} not selected stay in the queue"
        )
    else:
        lines.append(
            f"redrove {len(report.redriven):,} messages{detail} from {report.queue} to "
            f"{report.exchange} in {report.elapsed:.1f}s ({rate:,.0f}/s); {report.kept:,} "
            f"not selected and {len(report.failed):,} failed stay in the queue"
        )
    if report.interrupted:
        lines.append("interrupted: the messages above were moved; the rest stay queued")
    return "\n".join(lines)


async def scan(
    settings: Settings,
    selection: Selection,
    report: RedriveReport,
    act: Callable[[amqp.Delivery, DeadLetter, Reader], Any],
    *,
    window: int,
    name: str,
) -> None:
    """Look at each message once (up to the depth found at the start: messages
    dead-lettered meanwhile wait for the next run), ``act`` on the selected with at most
    ``window`` in flight and the bytes held bounded by PROMPTER_MAX_HELD_BYTES; stop at a
    signal (the second one: without waiting for what is in flight)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop, now = asyncio.Event(), asyncio.Event()

    def on_signal(_: int) -> None:
        (now if stop.is_set() else stop).set()

    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task[None]] = set()
    budget = settings.max_held_bytes
    held = 0
    async with reading(settings, f"prompter-worker dead-letters {name}", window) as reader:
        connection = reader.connection
        seen = selected = 0
        prefetch = window

        def done(task: asyncio.Task[None], *, size: int) -> None:
            nonlocal held
            held -= size
            slots.release()
            tasks.discard(task)
            if held <= budget // 2:
                connection.resume()

        with handle_signals(on_signal):
            while seen < reader.depth and not stop.is_set():
                if selection.limit is not None and selected >= selection.limit:
                    break
                delivery = await reader.next()
                if delivery is None:
                    break
                seen += 1
                letter = describe(delivery)
                if not selection.matches(letter):
                    report.kept += 1
                    delivery.body = b""  # held back unacknowledged; its body is not needed
                    if report.kept >= MAX_HELD_BACK:
                        report.error = (
                            f"stopped after looking at {seen:,} messages: {report.kept:,} "
                            "not selected are held back at once at most; run it again"
                        )
                        break
                    if report.kept + window > prefetch:
                        prefetch = min(report.kept + window * 2, 65_535)
                        connection.set_prefetch(READ_CHANNEL, prefetch)
                    continue
                selected += 1
                await slots.acquire()
                size = len(delivery.body)
                held += size
                if held > budget:
                    connection.pause()
                task = asyncio.create_task(act(delivery, letter, reader))
                tasks.add(task)
                task.add_done_callback(functools.partial(done, size=size))
            if tasks:
                waiter = asyncio.ensure_future(asyncio.wait(set(tasks)))
                aborted = asyncio.ensure_future(now.wait())
                await asyncio.wait({waiter, aborted}, return_when=asyncio.FIRST_COMPLETED)
                aborted.cancel()
                for task in set(tasks):
                    task.cancel()
        report.interrupted = stop.is_set()
        if connection.closed.done() and report.error is None:
            report.error = f"the connection closed: {connection.closed.exception()}"
    report.elapsed = loop.time() - started
    if report.failed and report.error is None:
        report.error = f"{len(report.failed):,} messages could not be handled"
