"""Cutting deliveries into batches, and owing acknowledgements: pure bookkeeping, no I/O.

:class:`Dispatcher` buffers deliveries (bounded by the prefetch counts) and hands out
batches of at most ``batch_size``, or whatever has waited ``batch_wait`` seconds, so batches
grow with the load. (Sending whatever is at hand whenever no batch is in flight was tried:
it makes hundreds of tiny transactions per second, whose fsyncs slow the broker sharing the
disk, and tripled the latency tail; bench/README.md.) Live deliveries go before replayed
ones, so backfill never starves live traffic.

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
# Suspects are picked once none arrived for this long: the whole redelivered window is then
# at hand, so the alternating order really covers all of it.
SUSPECT_SETTLE_SECONDS: Final = 0.05


class Source:
    """One consuming channel: its queue, and the acknowledgements owed on it.

    Delivery tags on a channel count up from 1. ``acked`` is the watermark: every tag up to
    it has been acknowledged (multiple-ack). Completed tags above a gap wait in ``done``,
    unless :meth:`strand` acks them one by one (``singly``): a suspect can hold a gap open
    across crashes, and what waits behind it must not be redelivered with it.
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
        self.singly: set[int] = set()
        self.consumer_tag: str | None = None

    def complete(self, tags: Sequence[int]) -> int | None:
        """Mark tags committed; move the watermark over them. Returns the tag to ack with
        ``multiple`` (the highest newly covered tag not already acked singly), or None."""
        self.done.update(tags)
        mark = self.acked
        done, singly = self.done, self.singly
        last = None
        while True:
            if mark + 1 in done:
                done.discard(mark + 1)
                last = mark + 1
            elif mark + 1 in singly:
                singly.discard(mark + 1)
            else:
                break
            mark += 1
        self.acked = mark
        return last

    def strand(self) -> list[int]:
        """The completed tags waiting above a gap, now to be acked one by one."""
        tags = sorted(self.done)
        self.singly.update(tags)
        self.done.clear()
        return tags

    @property
    def held(self) -> int:
        return self.received - self.acked - len(self.singly)


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
        self._last_suspect = 0.0
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()

    def add(self, source: Source, delivery: Delivery, now: float) -> None:
        """Take a delivery (called for every message: keep it cheap)."""
        source.received += 1
        item = (source, delivery, now)
        if delivery.delivery_count >= SUSPECT_AFTER:
            self._seq += 1
            self._last_suspect = now
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
                # Once their turn comes, suspects go one after another until none is left:
                # a crasher's neighbours must all be handled before anything else can
                # expose them to one more crash (and the delivery limit).
                suspects_turn = bool(self.suspects) and (
                    n == 0 or self._suspect_turn or self.draining
                )
                settle = self._last_suspect + SUSPECT_SETTLE_SECONDS - loop.time()
                if suspects_turn and self.inflight == 0:
                    if settle <= 0 or self.draining:
                        self.inflight += 1
                        self.exclusive = True
                        self._suspect_turn = len(self.suspects) > 1
                        return [self._pick_suspect()]
                    timeout = settle
                if n and not self.exclusive and not suspects_turn:
                    oldest = min(q[0][2] for q in (self.live, self.replay) if q)
                    due = oldest + self.batch_wait
                    now = loop.time()
                    if n >= self.batch_size or now >= due or self.draining:
                        self.inflight += 1
                        self._suspect_turn = bool(self.suspects)
                        return self._take()
                    timeout = due - now if timeout is None else min(timeout, due - now)
                elif self.draining and n == 0 and not self.suspects:
                    return None
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._arrived.wait()

    def done(self) -> None:
        self.inflight -= 1
        self.exclusive = False
        self._arrived.set()
