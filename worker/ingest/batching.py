"""Cutting deliveries into batches, bounded in count and in bytes: pure bookkeeping, no I/O.

:class:`Dispatcher` buffers deliveries and hands out batches of at most ``batch_size``
events and ``batch_bytes`` bytes (a single event larger than that goes alone), or
whatever has waited ``batch_wait`` seconds, so batches grow with the load. (Sending
whatever is at hand whenever no batch is in flight was tried: it makes hundreds of tiny
transactions per second, whose fsyncs slow the broker sharing the disk, and tripled the
latency tail; bench/README.md.) Live deliveries go before replayed ones, so backfill never
starves live traffic.

**Bytes held.** Every delivery's size counts from the moment it is buffered until its
batch is done (committed, dead-lettered or abandoned) or it is dropped. When the count
reaches ``budget``, :attr:`Dispatcher.on_full` is called (the session stops reading from
the broker); once it falls to three quarters of the budget, :attr:`Dispatcher.on_room`.
That is what bounds the worker's memory in bytes, whatever the event sizes.

**Suspects**: a delivery the broker has handed out at least twice before
(``delivery_count >= 2``) may be the one that killed its previous consumers. It is
processed alone, with nothing else in flight, lowest delivery count first, so a message
that crashes the process takes no innocent neighbour's commit with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Final

from worker.amqp.protocol import Delivery
from worker.ingest.acks import Source

SUSPECT_AFTER: Final = 2  # delivery_count from which a delivery is processed alone
# Suspects are picked once none arrived for this long: the whole redelivered window is then
# at hand, so the alternating order really covers all of it.
SUSPECT_SETTLE_SECONDS: Final = 0.05
#: Reading resumes once the bytes held fall to this share of the budget.
RESUME_AT: Final = 0.75


class Held:
    """A delivery in the worker's hands: where it came from, and when it arrived."""

    __slots__ = ("arrived", "delivery", "source")

    def __init__(self, source: Source, delivery: Delivery, arrived: float) -> None:
        self.source = source
        self.delivery = delivery
        self.arrived = arrived


def _nothing() -> None:
    return None


class Dispatcher:
    """Buffers deliveries and cuts them into batches (see the module docstring)."""

    def __init__(
        self,
        batch_size: int,
        batch_wait: float,
        *,
        batch_bytes: int = 1 << 62,
        budget: int = 1 << 62,
    ) -> None:
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.batch_bytes = batch_bytes
        self.budget = budget
        self.live: deque[Held] = deque()
        self.replay: deque[Held] = deque()
        self.suspects: list[tuple[int, int, Held]] = []
        self.inflight = 0
        self.exclusive = False
        self.draining = False
        self.closed = False
        self.held_bytes = 0
        self.full = False
        self.on_full: Callable[[], None] = _nothing
        self.on_room: Callable[[], None] = _nothing
        self._suspect_turn = False
        self._seq = 0
        self._last_suspect = 0.0
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()

    def add(self, source: Source, delivery: Delivery, now: float) -> None:
        """Take a delivery (called for every message: keep it cheap)."""
        source.received += 1
        item = Held(source, delivery, now)
        self.held_bytes += delivery.size
        if self.held_bytes >= self.budget and not self.full:
            self.full = True
            self.on_full()
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

    def release(self, batch: list[Held]) -> None:
        """A batch is done with: its bytes no longer count."""
        self.held_bytes -= sum(h.delivery.size for h in batch)
        self._check_room()

    def _check_room(self) -> None:
        if self.full and self.held_bytes <= self.budget * RESUME_AT:
            self.full = False
            self.on_room()

    @property
    def buffered(self) -> int:
        return len(self.live) + len(self.replay) + len(self.suspects)

    def wake(self) -> None:
        self._arrived.set()

    def close(self) -> None:
        """Stop handing out batches (a forced stop): waiting processors return None."""
        self.closed = True
        self._arrived.set()

    def drop(self, source: Source) -> int:
        """Forget buffered deliveries of a closed channel; the broker redelivers them."""
        before = self.buffered
        gone = [h for h in self.live if h.source is source]
        gone += [h for h in self.replay if h.source is source]
        gone += [s[2] for s in self.suspects if s[2].source is source]
        self.live = deque(h for h in self.live if h.source is not source)
        self.replay = deque(h for h in self.replay if h.source is not source)
        self.suspects = [s for s in self.suspects if s[2].source is not source]
        self.release(gone)
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
        room = self.batch_bytes
        for queue in (self.live, self.replay):
            while queue and len(batch) < size:
                bytes_ = queue[0].delivery.size
                if batch and bytes_ > room:
                    return batch  # the next one would overflow: it starts the next batch
                batch.append(queue.popleft())
                room -= bytes_
        return batch

    def _ready(self, n: int) -> bool:
        """Whether the buffered deliveries make a batch full enough to go now."""
        if n >= self.batch_size:
            return True
        total = 0
        for queue in (self.live, self.replay):
            for h in queue:
                total += h.delivery.size
                if total >= self.batch_bytes:
                    return True
        return False

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
                    oldest = min(q[0].arrived for q in (self.live, self.replay) if q)
                    due = oldest + self.batch_wait
                    now = loop.time()
                    if now >= due or self.draining or self.full or self._ready(n):
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
