"""The fault suite's own tools, checked without servers: a fault injector that silently
injected nothing, or a frame parser that miscounted, would make every scenario vacuous."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header

from tests.faults import conftest
from tests.faults.harness import ConfirmedPublisher
from tests.faults.proxy import FaultProxy, _FrameFilter, _message_id
from tests.faults.servers import (
    Certificates,
    PostgresPair,
    PrivateRabbit,
    RabbitCluster,
    ServerError,
)
from worker.config import Settings


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    started = time.monotonic()
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    return time.monotonic() - started


async def test_proxy_injects_latency_blackhole_and_reset() -> None:
    """Through the proxy: latency delays each direction; a blackhole holds the data until
    restored, then delivers it; a reset kills the connection with an RST."""
    server = await _echo_server()
    port = int(server.sockets[0].getsockname()[1])
    proxy = await FaultProxy(port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await _round_trip(reader, writer) < 0.1
        proxy.latency = 0.1
        assert await _round_trip(reader, writer) >= 0.2
        proxy.latency = 0.0
        proxy.blackhole()
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        proxy.restore()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
        assert proxy.reset() == 2
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


def _frames(*values: Any, channel: int = 1) -> bytes:
    return b"".join(amqp_frame.marshal(v, channel) for v in values)


def test_frame_filter_counts_deliveries_by_message_id_and_drops_acks() -> None:
    """Server to client: deliveries counted per message id (from the content header, past
    a headers table), redelivered flags counted. Client to server: basic.ack frames
    swallowed only while drop_acks is on; a stream split anywhere parses the same."""
    proxy = FaultProxy(1, amqp=True)
    to_client = _FrameFilter(client_side=False, decide=proxy._server_frame)
    props = spec.Basic.Properties(
        content_type="application/json",
        headers={"x-delivery-count": 3},
        delivery_mode=2,
        message_id="event-1",
    )
    stream = _frames(
        spec.Basic.Deliver("ctag", 1, False, "ex", "rk"),
        amqp_header.ContentHeader(0, 2, props),
        spec.Basic.Deliver("ctag", 2, True, "ex", "rk"),
        amqp_header.ContentHeader(0, 2, props),
    )
    out = b"".join(to_client.feed(stream[i : i + 5]) for i in range(0, len(stream), 5))
    assert out == stream
    assert (proxy.stats.deliveries, proxy.stats.redelivered) == (2, 1)
    assert proxy.stats.by_message_id == {"event-1": 2}
    assert proxy.stats.delivered_again == 1

    to_server = _FrameFilter(client_side=True, decide=proxy._client_frame)
    ack = _frames(spec.Basic.Ack(7, multiple=True))
    publish = _frames(spec.Basic.Publish(exchange="dlx", routing_key="rk"))
    assert to_server.feed(b"AMQP\x00\x00\x09\x01" + ack) == b"AMQP\x00\x00\x09\x01" + ack
    proxy.drop_acks = True
    assert to_server.feed(ack + publish) == publish
    assert proxy.stats.acks_dropped == 1


def test_message_id_of_a_header_without_one() -> None:
    """A content header without message_id yields None, whatever else it carries."""
    props = spec.Basic.Properties(content_type="text/plain", priority=5, reply_to="r")
    frame = amqp_frame.marshal(amqp_header.ContentHeader(0, 0, props), 1)
    assert _message_id(frame) is None


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", None)])
def test_servers_that_cannot_start_fail_in_ci_and_skip_elsewhere(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException] | None
) -> None:
    """With CI=true a fault suite whose private servers cannot start fails (it must never
    pass by running nothing); elsewhere it is skipped with the reason."""
    monkeypatch.setenv("CI", ci)
    expected = outcome or pytest.skip.Exception
    with pytest.raises(expected, match="private servers did not start: no initdb"):
        conftest._unavailable(str(ServerError("no initdb")))


def test_cluster_and_failover_urls_are_what_the_worker_accepts(tmp_path: Path) -> None:
    """Worker i of a cluster lists every node starting at node i; the cluster's checks use
    a node it has not taken down; a publisher moves to the next node at each reconnection;
    the primary/standby URL names both hosts with target_session_attrs=read-write; the
    worker's settings accept both URLs as they are."""
    certs = Certificates(ca=tmp_path, cert=tmp_path, key=tmp_path, other_ca=tmp_path)
    cluster = RabbitCluster(tmp_path / "mq", certs)
    cluster.nodes = [
        PrivateRabbit(tmp_path / f"n{i}", 5000 + i, 6000 + i, 7000 + i, certs, name=f"c{i}")
        for i in range(3)
    ]
    urls = cluster.urls(1, query="heartbeat=3")
    assert [u.rpartition("@")[2] for u in urls.split(",")] == [
        "127.0.0.1:5001/?heartbeat=3",
        "127.0.0.1:5002/?heartbeat=3",
        "127.0.0.1:5000/?heartbeat=3",
    ]
    assert len({n.node for n in cluster.nodes}) == 3
    cluster.down.update({0, 1})
    assert cluster.port == 5002

    publisher = ConfirmedPublisher(urls, "exchange")
    tried = []
    for _ in range(4):
        tried.append(publisher._url().rpartition("@")[2])
        publisher._node += 1
    assert tried == [
        "127.0.0.1:5001/?heartbeat=3&name=fault-publisher",
        "127.0.0.1:5002/?heartbeat=3&name=fault-publisher",
        "127.0.0.1:5000/?heartbeat=3&name=fault-publisher",
        "127.0.0.1:5001/?heartbeat=3&name=fault-publisher",
    ]
    assert (
        ConfirmedPublisher("amqp://g:g@h:1/", "x")._url() == "amqp://g:g@h:1/?name=fault-publisher"
    )

    pair = PostgresPair(tmp_path / "pg", certs, synchronous=True)
    url = pair.url("db", user="worker", password="p@ss word")
    hosts = f"127.0.0.1:{pair.primary.port},127.0.0.1:{pair.standby.port}"
    assert url == (
        f"postgresql://worker:p%40ss%20word@{hosts}/db"
        "?sslmode=disable&target_session_attrs=read-write"
    )
    settings = Settings.from_env({"DATABASE_URL": url, "AMQP_URL": urls})
    assert (settings.database_url, settings.amqp_url) == (url, urls)
