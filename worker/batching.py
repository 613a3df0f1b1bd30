"""Cutting deliveries into batches, and owing acknowledgements: pure bookkeeping, no I/O.

:class:`Dispatcher` buffers deliveries (bounded by the prefetch counts) and hands out
batches of at most ``batch_size``. When no batch is in flight, whatever is buffered goes at
once (the database is idle: waiting would only add latency); while one is, deliveries wait
up to ``batch_wait`` seconds for company, so batches grow with the load. Live deliveries go
before replayed ones, so backfill never starves live traffic.

Suspects: a delivery the broker has handed out at least twice before
(``x-delivery-count >= 2``) may be the one that killed its previous consumers. It is
processed alone, with nothing else in flight, lowest delivery count first, so a message
that crashes the process takes no innocent neighbour's commit with it; the broker's
delivery limit then dead-letters it.

:class:`Source` tracks one consuming channel's acknowledgements: tags complete in any
order (two batches commit concurrently), and the multiple-ack watermark only moves over a
contiguous run of completed tags.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Final

from worker.amqp import ConsumerProtocol, Delivery

SUSPECT_AFTER: Final = 2  # x-delivery-count from which a delivery is processed alone


class Source:
    """One consuming channel: its queue, and the acknowledgements owed on it.

    Delivery tags on a channel count up from 1. ``acked`` is the watermark: every tag up to
    it has been acknowledged (multiple-ack). Completed tags above a gap wait in ``done``.
    """

    def __init__(
        self, protocol: ConsumerProtocol | None, channel: int, queue: str, *, replay: bool
    ) -> None:
        self.protocol = protocol
        self.channel = channel
        self.queue = queue
        self.replay = replay
        self.open = True
        self.acked = 0
        self.received = 0
        self.done: set[int] = set()
        self.consumer_tag: str | None = None

    def complete(self, tags: Sequence[int]) -> int | None:
        """Mark tags committed; return the new watermark if it moved."""
        self.done.update(tags)
        mark = self.acked
        done = self.done
        while mark + 1 in done:
            mark += 1
            done.discard(mark)
        if mark == self.acked:
            return None
        self.acked = mark
        return mark

    @property
    def held(self) -> int:
        return self.received - self.acked


# A delivery in the buffers: (source, delivery, arrival time on the loop clock).
Held = tuple[Source, Delivery, float]


class Dispatcher:
    """Buffers deliveries and cuts them into batches (see the module docstring)."""

    def __init__(self, batch_size: int, batch_wait: float) -> None:
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.live: deque[Held] = deque()
        self.replay: deque[Held] = deque()
        self.suspects: list[tuple[int, int, Held]] = []
        self.inflight = 0
        self.exclusive = False
        self.draining = False
        self.closed = False
        self._suspect_turn = False
        self._seq = 0
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()

    def add(self, source: Source, delivery: Delivery, now: float) -> None:
        """Take a delivery (called for every message: keep it cheap)."""
        source.received += 1
        item = (source, delivery, now)
        if delivery.delivery_count >= SUSPECT_AFTER:
            self._seq += 1
            self.suspects.append((delivery.delivery_count, self._seq, item))
            self._arrived.set()
            return
        queue = self.replay if source.replay else self.live
        queue.append(item)
        n = len(queue)
        if n == 1 or n >= self.batch_size:
            self._arrived.set()

    @property
    def buffered(self) -> int:
        return len(self.live) + len(self.replay) + len(self.suspects)

    def wake(self) -> None:
        self._arrived.set()

    def drop(self, source: Source) -> int:
        """Forget buffered deliveries of a closed channel; the broker redelivers them."""
        before = self.buffered
        self.live = deque(d for d in self.live if d[0] is not source)
        self.replay = deque(d for d in self.replay if d[0] is not source)
        self.suspects = [s for s in self.suspects if s[2][0] is not source]
        self._arrived.set()
        return before - self.buffered

    def _pick_suspect(self) -> Held:
        # Lowest delivery count first: a repeat crasher has the highest count, so every
        # innocent exposed alongside it is handled before it is touched again. Among equal
        # counts the order alternates with the count's parity (FIFO, then LIFO), so a crasher
        # cannot stay in front of the same neighbours cycle after cycle.
        low = min(c for c, _, _ in self.suspects)
        tied = [s for s in self.suspects if s[0] == low]
        chosen = min(tied, key=lambda s: s[1]) if low % 2 else max(tied, key=lambda s: s[1])
        self.suspects.remove(chosen)
        return chosen[2]

    def _take(self) -> list[Held]:
        batch: list[Held] = []
        size = self.batch_size
        for queue in (self.live, self.replay):
            while queue and len(batch) < size:
                batch.append(queue.popleft())
        return batch

    async def next_batch(self) -> list[Held] | None:
        """The next batch to process, or None once closed (or drained while draining)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            while True:
                if self.closed:
                    return None
                n = len(self.live) + len(self.replay)
                timeout: float | None = None
                if (
                    self.suspects
                    and self.inflight == 0
                    and (n == 0 or self._suspect_turn or self.draining)
                ):
                    self.inflight += 1
                    self.exclusive = True
                    self._suspect_turn = False
                    return [self._pick_suspect()]
                if n and not self.exclusive:
                    oldest = min(q[0][2] for q in (self.live, self.replay) if q)
                    due = oldest + self.batch_wait
                    now = loop.time()
                    # Nothing in flight: the database is idle, and waiting for company
                    # would only add latency. Otherwise wait (up to batch_wait) for more.
                    idle = self.inflight == 0
                    if n >= self.batch_size or now >= due or idle or self.draining:
                        self.inflight += 1
                        self._suspect_turn = bool(self.suspects)
                        return self._take()
                    timeout = due - now
                elif self.draining and n == 0 and not self.suspects:
                    return None
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._arrived.wait()

    def done(self, batch: list[Held]) -> None:
        self.inflight -= 1
        self.exclusive = False
        self._arrived.set()
