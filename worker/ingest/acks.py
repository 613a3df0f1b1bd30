"""The acknowledgements owed on one consuming channel: pure bookkeeping, no I/O.

Delivery tags on a channel count up from 1. A delivery is *settled* once its rows are
committed, its dead-letter copy is confirmed, or it was rejected to the broker's own
dead-lettering. Tags settle in any order (two batches commit concurrently), and one
multiple-ack covers every tag up to a *watermark*: :meth:`Source.complete` moves the
watermark over a contiguous run of settled tags only.

Tags settled one by one (rejected, or acked alone while a suspect holds a gap open:
:meth:`Source.settle_stranded`) are *settled alone*: the watermark steps over them, and a
later multiple-ack that covers them is harmless (it acknowledges what is outstanding).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.amqp.protocol import Connection


class Source:
    """One consuming channel of a connection: its queue, and the acknowledgements owed."""

    def __init__(self, channel: int, queue: str, *, replay: bool) -> None:
        self.channel = channel
        self.queue = queue
        self.replay = replay
        self.connection: Connection | None = None
        self.open = True
        self.consumer_tag: str | None = None
        self.acked = 0  # the watermark: every tag up to it is settled
        self.received = 0
        self.completed: set[int] = set()  # settled above a gap, waiting for the watermark
        self.settled_alone: set[int] = set()

    def complete(self, tags: Iterable[int]) -> int | None:
        """Mark tags settled; move the watermark over them. Returns the tag to ack with
        ``multiple`` (the highest newly covered tag not settled alone), or None."""
        completed, alone = self.completed, self.settled_alone
        completed.update(tags)
        mark = self.acked
        last = None
        while True:
            if mark + 1 in completed:
                completed.discard(mark + 1)
                last = mark + 1
            elif mark + 1 in alone:
                alone.discard(mark + 1)
            else:
                break
            mark += 1
        self.acked = mark
        return last

    def settle_alone(self, tag: int) -> None:
        """``tag`` was settled by itself (rejected, or acked alone)."""
        self.settled_alone.add(tag)

    def settle_stranded(self) -> list[int]:
        """The settled tags waiting above a gap, now to be acked one by one."""
        tags = sorted(self.completed)
        self.settled_alone.update(tags)
        self.completed.clear()
        return tags

    @property
    def held(self) -> int:
        """Deliveries received and not settled yet."""
        return self.received - self.acked - len(self.settled_alone)
