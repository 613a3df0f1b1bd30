"""Batching and acknowledgement bookkeeping: pure logic, no servers."""

from __future__ import annotations

import asyncio

import pytest

from worker.amqp.protocol import Delivery
from worker.ingest.acks import Source
from worker.ingest.batching import Dispatcher


def delivery(tag: int, *, count: int = 0, channel: int = 1) -> Delivery:
    d = Delivery(channel, tag, b"", redelivered=count > 0)
    d.delivery_count = count
    return d


async def parked(d: Dispatcher, task: asyncio.Task[object]) -> None:
    """Let ``task`` run until it waits: one turn of the loop takes it as far as it can go
    without an event, and there it waits on the dispatcher's (which it cleared first)."""
    await asyncio.sleep(0)
    assert not d._arrived.is_set()


def test_watermark_moves_over_contiguous_tags_only() -> None:
    """Tags completed out of order ack nothing until the gap below them is filled."""
    s = Source(1, "q", replay=False)
    s.received = 6
    assert s.complete([3, 4]) is None
    assert s.complete([1]) == 1
    assert s.complete([2]) == 4
    assert s.complete([6]) is None
    assert s.complete([5]) == 6
    assert s.held == 0


async def test_full_batches_go_at_once_and_the_rest_after_the_wait() -> None:
    """A full batch is cut immediately; a partial one waits for company up to batch_wait,
    not longer."""
    d = Dispatcher(batch_size=3, batch_wait=0.2)
    s = Source(1, "q", replay=False)
    loop = asyncio.get_running_loop()
    for tag in range(1, 6):
        d.add(s, delivery(tag), loop.time())
    first = await asyncio.wait_for(d.next_batch(), 1)
    assert [h.delivery.delivery_tag for h in first or []] == [1, 2, 3]
    started = loop.time()
    second = await asyncio.wait_for(d.next_batch(), 2)
    assert [h.delivery.delivery_tag for h in second or []] == [4, 5]
    assert loop.time() - started >= 0.15


async def test_live_deliveries_go_before_replayed_ones() -> None:
    """With both buffered, a batch takes live deliveries first."""
    d = Dispatcher(batch_size=4, batch_wait=0)
    live = Source(1, "live", replay=False)
    replay = Source(2, "replay", replay=True)
    now = asyncio.get_running_loop().time()
    for tag in range(1, 4):
        d.add(replay, delivery(tag, channel=2), now)
    for tag in range(1, 3):
        d.add(live, delivery(tag), now)
    batch = await asyncio.wait_for(d.next_batch(), 1)
    assert [(h.source.queue, h.delivery.delivery_tag) for h in batch or []] == [
        ("live", 1),
        ("live", 2),
        ("replay", 1),
        ("replay", 2),
    ]


async def test_suspects_go_alone_with_nothing_in_flight() -> None:
    """A delivery seen twice before is processed in a batch of its own, and only once no
    other batch is in flight; lowest delivery count first."""
    d = Dispatcher(batch_size=10, batch_wait=0)
    s = Source(1, "q", replay=False)
    now = asyncio.get_running_loop().time()
    d.add(s, delivery(1), now)
    d.add(s, delivery(2, count=5), now)
    d.add(s, delivery(3, count=2), now)
    first = await asyncio.wait_for(d.next_batch(), 1)
    assert [h.delivery.delivery_tag for h in first or []] == [1]
    waiting = asyncio.create_task(d.next_batch())
    await parked(d, waiting)
    assert not waiting.done()  # the clean batch is still in flight
    d.done()
    second = await asyncio.wait_for(waiting, 1)
    assert [h.delivery.delivery_tag for h in second or []] == [3]
    third = asyncio.create_task(d.next_batch())
    await parked(d, third)
    assert not third.done()  # a suspect is in flight: everything else waits
    d.done()
    assert [h.delivery.delivery_tag for h in await asyncio.wait_for(third, 1) or []] == [2]


@pytest.mark.parametrize(("count", "expected"), [(3, [1, 2, 3]), (4, [3, 2, 1])])
async def test_ties_alternate_order_with_the_count(count: int, expected: list[int]) -> None:
    """Equal counts go first-in-first-out when odd, last-in-first-out when even, so a
    crasher cannot stay in front of the same neighbours cycle after cycle."""
    d = Dispatcher(batch_size=10, batch_wait=0)
    s = Source(1, "q", replay=False)
    now = asyncio.get_running_loop().time()
    for tag in (1, 2, 3):
        d.add(s, delivery(tag, count=count), now)
    order = []
    for _ in range(3):
        batch = await asyncio.wait_for(d.next_batch(), 1)
        order.append((batch or [])[0].delivery.delivery_tag)
        d.done()
    assert order == expected


async def test_drop_forgets_a_closed_channel_and_draining_ends() -> None:
    """Buffered deliveries of a closed channel are dropped (the broker redelivers them);
    once draining and empty, next_batch returns None."""
    d = Dispatcher(batch_size=10, batch_wait=5)
    gone = Source(1, "q", replay=False)
    kept = Source(2, "r", replay=True)
    now = asyncio.get_running_loop().time()
    d.add(gone, delivery(1), now)
    d.add(kept, delivery(1, channel=2), now)
    d.add(gone, delivery(2, count=3), now)
    assert d.drop(gone) == 2
    d.draining = True
    batch = await asyncio.wait_for(d.next_batch(), 1)
    assert [(h.source.queue, h.delivery.delivery_tag) for h in batch or []] == [("r", 1)]
    d.done()
    assert await asyncio.wait_for(d.next_batch(), 1) is None


def test_tags_stranded_behind_a_gap_are_acked_one_by_one_and_skipped_later() -> None:
    """Completed tags above a gap held open (by a suspect) can be acked one by one; when
    the gap fills, the watermark moves over them and the multiple-ack names only a tag
    that is still outstanding."""
    s = Source(1, "q", replay=False)
    s.received = 5
    assert s.complete([2, 3]) is None
    assert s.settle_stranded() == [2, 3]
    assert s.held == 3  # 1, 4 and 5
    assert s.complete([1]) == 1  # 2 and 3 were acked already
    assert s.acked == 3
    assert s.complete([5]) is None
    assert s.settle_stranded() == [5]
    assert s.complete([4]) == 4
    assert (s.acked, s.held) == (5, 0)


async def test_suspects_go_back_to_back_once_their_turn_comes() -> None:
    """After a clean batch, every pending suspect goes, one at a time, before the next
    clean batch: nothing else exposes a crasher's neighbours to one more crash."""
    d = Dispatcher(batch_size=10, batch_wait=0)
    s = Source(1, "q", replay=False)
    now = asyncio.get_running_loop().time()
    d.add(s, delivery(1), now)
    for tag in (2, 3, 4):
        d.add(s, delivery(tag, count=2), now)
    order = []
    for tag in (5, 6, 7, 8):
        batch = await asyncio.wait_for(d.next_batch(), 1)
        order.append([h.delivery.delivery_tag for h in batch or []])
        d.add(s, delivery(tag), now)  # clean traffic keeps arriving
        d.done()
    assert order == [[1], [4], [3], [2]]


def sized(tag: int, size: int) -> Delivery:
    d = delivery(tag)
    d.body = b"x" * size
    return d


async def test_batches_are_bounded_in_bytes_and_a_large_event_goes_alone() -> None:
    """A batch stops before the event that would take it over batch_bytes; an event larger
    than batch_bytes on its own is a batch of one; a batch holding its byte bound goes
    without waiting for batch_wait."""
    d = Dispatcher(batch_size=100, batch_wait=30, batch_bytes=1000)
    s = Source(1, "q", replay=False)
    now = asyncio.get_running_loop().time()
    for tag, size in ((1, 400), (2, 400), (3, 400), (4, 5000), (5, 10)):
        d.add(s, sized(tag, size), now)
    cut = []
    for _ in range(3):
        batch = await asyncio.wait_for(d.next_batch(), 1)
        cut.append([h.delivery.delivery_tag for h in batch or []])
        d.done()
    assert cut == [[1, 2], [3], [4]]


async def test_the_byte_budget_pauses_and_resumes_reading() -> None:
    """Holding the budget calls on_full once; releasing below three quarters calls on_room
    once; bytes count from add to release."""
    d = Dispatcher(batch_size=10, batch_wait=0, budget=1000)
    calls: list[str] = []
    d.on_full = lambda: calls.append("full")
    d.on_room = lambda: calls.append("room")
    s = Source(1, "q", replay=False)
    now = asyncio.get_running_loop().time()
    d.add(s, sized(1, 600), now)
    assert calls == []
    d.add(s, sized(2, 600), now)
    d.add(s, sized(3, 600), now)
    assert calls == ["full"]
    assert d.held_bytes == 1800
    batch = await asyncio.wait_for(d.next_batch(), 1)
    assert batch is not None
    d.release(batch[:2])
    assert calls == ["full", "room"]
    assert d.held_bytes == 600
    assert d.drop(s) == 0  # everything was taken by the batch already
