"""The publisher library and ``broker.connect`` under faults, with real sockets: brokers
that close at once, never answer or speak another protocol (under asyncio's own event loop
and under uvloop), a proxy to the real RabbitMQ that counts connections and can hold the
broker's replies back, and ``close()`` while publishes are in flight."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from tests.conftest import AMQP_URL
from tests.factories import Tenant, event_doc
from tests.helpers import queue_depth, rabbitmqctl, wait_until
from worker.amqp import broker
from worker.errors import BrokerUnavailable, PublishError, WorkerError
from worker.publisher import Publisher

TENANT = Tenant(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))
UNUSED = broker.Topology(
    exchange="unused.events",
    queue="unused.ingest",
    replay_queue="unused.ingest.replay",
    dead_letter_exchange="unused.dlx",
    dead_letter_queue="unused.ingest.dead",
    delivery_limit=20,
)
T = TypeVar("T")


class Server:
    """A TCP server on 127.0.0.1 with its own event loop in its own thread (so it accepts
    and closes independently of the client's loop, as a real peer does), behaving as
    ``mode`` says:

    - ``close``: accept, close at once;
    - ``eof``: accept, read the protocol header, half-close (a clean end of stream);
    - ``hang``: accept, read, never answer;
    - ``garbage``: answer the protocol header with an HTTP error, then close;
    - ``bad-frame``: answer with a frame no AMQP method has, and stay open;
    - ``proxy``: relay to the real broker; :meth:`hold` stops relaying the broker's
      replies (they wait in the proxy) until :meth:`release`.

    ``accepted`` counts the connections it accepted.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.accepted = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._relaying: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    def __enter__(self) -> Server:
        self._thread.start()
        self._server = self._call(self._start())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        """This server's URL; a proxy's carries the real broker's credentials."""
        if self.mode == "proxy":
            real = urllib.parse.urlsplit(AMQP_URL)
            login = real.netloc.rpartition("@")[0]
            return urllib.parse.urlunsplit(real._replace(netloc=f"{login}@127.0.0.1:{self.port}"))
        return f"amqp://guest:s3cret-pw@127.0.0.1:{self.port}/"

    def hold(self) -> None:
        """Stop relaying the broker's replies (confirms included) to the client."""
        self._loop.call_soon_threadsafe(self._relay().clear)

    def release(self) -> None:
        """Relay the broker's replies again, those held back first."""
        self._loop.call_soon_threadsafe(self._relay().set)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _relay(self) -> asyncio.Event:
        if self._relaying is None:
            self._relaying = asyncio.Event()
            self._relaying.set()
        return self._relaying

    async def _start(self) -> asyncio.Server:
        self._relay()
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _stop(self) -> None:
        """Stop accepting, end every connection, and wait for their handlers to finish."""
        assert self._server is not None
        self._server.close()
        self.release()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            if self.mode == "close":
                return
            if self.mode == "proxy":
                await self._proxy(reader, writer)
                return
            await reader.readexactly(8)  # the client's protocol header
            if self.mode == "eof":
                writer.write_eof()
            elif self.mode == "garbage":
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            elif self.mode == "bad-frame":
                writer.write(b"\x01\x00\x00\x00\x00\x00\x04abcd\xce")
                await writer.drain()
            await reader.read()  # until the client goes away
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self._handlers.discard(task)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parts = urllib.parse.urlsplit(AMQP_URL)
        up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 5672)
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, held: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if held:
                        await self._relay().wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        finally:
            up_writer.close()
            self._writers.discard(up_writer)


def run_on(loop: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh loop of the named kind."""
    if loop == "uvloop":
        return uvloop.run(coro)
    return asyncio.run(coro)


def topo(names: dict[str, str]) -> broker.Topology:
    return broker.Topology(**names, delivery_limit=20)


async def _outcomes(
    calls: list[Callable[[], Awaitable[object]]],
) -> list[tuple[BaseException | None, float]]:
    """Run the calls concurrently; each one's exception (or None) and when it ended."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(call: Callable[[], Awaitable[object]]) -> tuple[BaseException | None, float]:
        try:
            await call()
        except Exception as exc:
            return exc, loop.time() - start
        return None, loop.time() - start

    return await asyncio.gather(*(one(c) for c in calls))


# --- connecting -----------------------------------------------------------------------------

MODES = ["close", "eof", "garbage", "bad-frame", "hang"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("mode", MODES)
def test_every_connect_failure_is_broker_unavailable(loop: str, mode: str) -> None:
    """Whatever the peer does at connect time (closes at once, ends the stream, never
    answers, answers in another protocol) and whatever the event loop, ``broker.connect``
    raises BrokerUnavailable naming the node (password masked), never aiormq's own
    exception (``StopAsyncIteration`` under uvloop, for one); the publisher's ``publish()``
    too. Repeated, since which exception aiormq raises depends on timing."""
    tries = 1 if mode == "hang" else 5

    async def attempt(url: str) -> list[BaseException]:
        caught: list[BaseException] = []
        for _ in range(tries):
            with pytest.raises(BrokerUnavailable) as direct:
                await broker.connect(url, name="test-connect-faults", timeout=0.5)
            caught.append(direct.value)
            publisher = Publisher(url, UNUSED, connect_timeout=0.5)
            with pytest.raises(BrokerUnavailable) as published:
                await publisher.publish(event_doc(TENANT))
            await publisher.close()
            caught.append(published.value)
        return caught

    with Server(mode) as server:
        caught = run_on(loop, attempt(server.url))
    for exc in caught:
        assert f"127.0.0.1:{server.port}" in str(exc)
        assert "s3cret-pw" not in str(exc)


def test_connect_tries_every_node_and_names_each_failure() -> None:
    """A cluster URL whose nodes all misbehave differently: one BrokerUnavailable that
    names every node tried with what went wrong there."""

    async def attempt(url: str) -> BrokerUnavailable:
        with pytest.raises(BrokerUnavailable) as caught:
            await broker.connect(url, name="test-connect-faults", timeout=0.5)
        return caught.value

    with Server("close") as closing, Server("hang") as hanging, Server("garbage") as garbage:
        url = ",".join(s.url for s in (closing, hanging, garbage))
        exc = run_on("uvloop", attempt(url))
        assert (closing.accepted, hanging.accepted, garbage.accepted) == (1, 1, 1)
    for server in (closing, hanging, garbage):
        assert f"127.0.0.1:{server.port}" in str(exc)
    assert "no answer within 0.5s" in str(exc)


async def test_concurrent_publishes_share_one_connect_attempt() -> None:
    """Eight concurrent publishes against a broker that accepts and never answers: one
    connection attempt, and all eight fail together with its outcome (BrokerUnavailable)
    when it times out, instead of one after another."""
    with Server("hang") as server:
        publisher = Publisher(server.url, UNUSED, connect_timeout=2.0)
        results = await _outcomes([lambda: publisher.publish(event_doc(TENANT))] * 8)
        await publisher.close()
        assert server.accepted == 1
    errors = [exc for exc, _ in results]
    assert all(isinstance(e, BrokerUnavailable) for e in errors), errors
    assert all("no answer within 2s" in str(e) for e in errors), errors[0]
    ends = [at for _, at in results]
    assert max(ends) - min(ends) < 1.0  # together: well within one connect timeout


async def test_a_failed_connect_is_retried_by_the_next_call() -> None:
    """Callers share an attempt while it runs, not its failure forever: the next call after
    a failed attempt makes a new one."""
    with Server("close") as server:
        publisher = Publisher(server.url, UNUSED, connect_timeout=2.0)
        for _ in range(3):
            with pytest.raises(BrokerUnavailable):
                await publisher.publish(event_doc(TENANT))
        await publisher.close()
        assert server.accepted == 3


async def test_one_deadline_covers_connecting() -> None:
    """``timeout`` bounds the whole publish: with a connect timeout far longer, a broker
    that never answers fails the publish after ``timeout`` (BrokerUnavailable saying so)."""
    with Server("hang") as server:
        publisher = Publisher(server.url, UNUSED, timeout=1.0, connect_timeout=120.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(BrokerUnavailable, match=r"within 1s"):
            await publisher.publish(event_doc(TENANT))
        assert loop.time() - start < 60  # the deadline, not the connect timeout
        await publisher.close()


async def test_one_deadline_covers_the_confirm(topology: dict[str, str]) -> None:
    """Connected, then the broker's replies stop (held in a proxy): the publish fails with
    PublishError after ``timeout``; the message may have reached the queue."""
    with Server("proxy") as proxy:
        publisher = Publisher(proxy.url, topo(topology), timeout=1.0)
        await publisher.publish(event_doc(TENANT))
        proxy.hold()
        with pytest.raises(PublishError, match=r"no confirm .* within 1s"):
            await publisher.publish(event_doc(TENANT))
        proxy.release()
        await publisher.close()


# --- closing --------------------------------------------------------------------------------


async def test_close_is_final_and_fails_in_flight_and_waiting_publishes(
    topology: dict[str, str],
) -> None:
    """close() while 4 publishes await their confirm (the broker's replies held back) and
    36 more wait for a window slot: every one fails with BrokerUnavailable saying the
    publisher is closed (never CancelledError or a bare Exception); no caller opens a new
    connection (the proxy saw one); later calls raise the same way and connect nowhere."""
    name = f"test-publisher-close-{uuid.uuid4().hex[:8]}"
    with Server("proxy") as proxy:
        publisher = Publisher(proxy.url, topo(topology), window=4, name=name)
        await publisher.publish(event_doc(TENANT))
        proxy.hold()
        callers = [asyncio.create_task(publisher.publish(event_doc(TENANT))) for _ in range(40)]

        async def window_full() -> bool:
            return publisher.outstanding == 4

        await wait_until(window_full, within=30, message="4 publishes in flight")
        closing = asyncio.create_task(publisher.close(grace=0))
        done, _ = await asyncio.wait(callers, timeout=30)
        assert len(done) == 40
        proxy.release()  # the broker's reply to the connection close
        await asyncio.wait_for(closing, timeout=30)
        errors = [task.exception() for task in callers]
        assert all(isinstance(e, BrokerUnavailable) for e in errors), errors
        assert all("closed" in str(e) for e in errors), errors
        for later in (publisher.publish(event_doc(TENANT)), publisher.connect()):
            with pytest.raises(BrokerUnavailable, match="closed"):
                await later
        with pytest.raises(BrokerUnavailable, match="closed"):
            await publisher.publish_many([event_doc(TENANT)])
        assert proxy.accepted == 1
    assert not [line for line in _connections() if name in line]


async def test_close_fails_callers_waiting_for_the_connection() -> None:
    """close() while 8 callers wait for a connection attempt that hangs: each fails with
    BrokerUnavailable saying the publisher is closed, the attempt is abandoned, and no
    further connection is made, then or by later calls."""
    with Server("hang") as server:
        publisher = Publisher(server.url, UNUSED, connect_timeout=60.0)
        callers = [asyncio.create_task(publisher.publish(event_doc(TENANT))) for _ in range(8)]

        async def connecting() -> bool:
            return server.accepted == 1

        await wait_until(connecting, within=30, message="the connection attempt")
        await asyncio.wait_for(publisher.close(), timeout=30)
        done, _ = await asyncio.wait(callers, timeout=30)
        assert len(done) == 8
        errors = [task.exception() for task in callers]
        assert all(isinstance(e, BrokerUnavailable) and "closed" in str(e) for e in errors), errors
        with pytest.raises(BrokerUnavailable, match="closed"):
            await publisher.publish(event_doc(TENANT))
        assert server.accepted == 1


async def test_close_waits_for_the_confirms_in_flight(topology: dict[str, str]) -> None:
    """close() with its default grace lets every publish already in flight finish: each
    one is confirmed, none fails."""
    async with Publisher(AMQP_URL, topo(topology), window=64) as publisher:
        futures = [await publisher.send(_prepared()) for _ in range(200)]
        await publisher.close()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results == [None] * 200
    assert await queue_depth(topology["queue"]) == 200


async def test_publish_many_returns_only_when_all_were_confirmed(
    topology: dict[str, str],
) -> None:
    """close() at varying moments during publish_many of 1,500 events, 30 times: each time
    it either returns 1,500 or raises BrokerUnavailable saying how many were confirmed, and
    at least that many reached the queue. Never a short count without an error."""
    total = 1500
    outcomes = [await _publish_many_closed_midway(topology, total, trial) for trial in range(30)]
    for outcome in outcomes:
        if isinstance(outcome, int):
            assert outcome == total
            continue
        assert isinstance(outcome, BrokerUnavailable), outcome
        assert "closed" in str(outcome)
        assert re.match(rf"\d+ of {total} events confirmed; then: ", str(outcome)), outcome
    confirmed = [o if isinstance(o, int) else int(str(o).split()[0]) for o in outcomes]
    assert all(
        n < total for n, o in zip(confirmed, outcomes, strict=True) if not isinstance(o, int)
    )
    assert await queue_depth(topology["queue"]) >= sum(confirmed)
    assert any(n < total for n in confirmed)  # close() did interrupt some of them


async def _publish_many_closed_midway(
    topology: dict[str, str], total: int, trial: int
) -> int | BaseException:
    """publish_many, closed part way (a different moment each trial): what it returned or
    raised."""
    publisher = Publisher(AMQP_URL, topo(topology), window=64)
    await publisher.connect()
    events = [event_doc(TENANT) for _ in range(total)]
    many: asyncio.Task[int] = asyncio.create_task(publisher.publish_many(events))

    async def started() -> bool:
        return publisher.outstanding > 0 or many.done()

    await wait_until(started, within=30, message="publish_many sending")
    for _ in range(trial * 7):
        await asyncio.sleep(0)  # let it run a little further each trial
    await publisher.close(grace=0 if trial % 2 else None)
    try:
        return await many
    except WorkerError as exc:
        return exc


def _prepared() -> Any:
    from worker.publisher import prepare

    return prepare(event_doc(TENANT))


def _connections() -> list[str]:
    return rabbitmqctl("list_connections", "client_properties").splitlines()
