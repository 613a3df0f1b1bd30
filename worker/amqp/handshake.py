"""Opening an AMQP connection: the handshake (PLAIN or EXTERNAL authentication, tuning
frame size and heartbeats, the virtual host) and what it learns of the server."""

from __future__ import annotations

from typing import Final

from pamqp import commands as spec

from worker.amqp.link import Link
from worker.amqp.publishing import AMQPError
from worker.amqp.reader import MAX_FRAME

#: RabbitMQ 4.3 counts failed deliveries in x-delivery-count and every acquisition in
#: x-acquired-count; before, x-delivery-count counted every return.
ACQUIRED_COUNT_SINCE: Final = (4, 3)


async def handshake(
    link: Link,
    credentials: tuple[str, str] | None,
    vhost: str,
    name: str,
    timeout: float,
) -> None:
    """Log in with PLAIN (``credentials``: user, password) or, with None, EXTERNAL
    (the TLS client certificate names the user)."""
    start = await link.wait_first(spec.Connection.Start, timeout)
    mechanisms = start.mechanisms.split() if isinstance(start.mechanisms, str) else []
    mechanism = "PLAIN" if credentials is not None else "EXTERNAL"
    if mechanism not in mechanisms:
        raise AMQPError(f"the broker offers no {mechanism} authentication ({start.mechanisms})")
    version = (start.server_properties or {}).get("version", "0")
    link.server_version = parse_version(version)
    link.reader.acquired_counts = link.server_version >= ACQUIRED_COUNT_SINCE
    response = "" if credentials is None else f"\0{credentials[0]}\0{credentials[1]}"
    tune = await link.rpc(
        spec.Connection.StartOk(
            client_properties={
                "connection_name": name,
                "product": "prompter-worker",
                "capabilities": {
                    "consumer_cancel_notify": True,
                    "connection.blocked": True,
                    "publisher_confirms": True,
                },
            },
            mechanism=mechanism,
            response=response,
        ),
        0,
        (spec.Connection.Tune,),
        timeout,
    )
    link.frame_max = min(tune.frame_max or MAX_FRAME, MAX_FRAME)
    if tune.heartbeat:
        link.heartbeat = min(link.heartbeat, tune.heartbeat) if link.heartbeat else tune.heartbeat
    link.send(
        spec.Connection.TuneOk(
            channel_max=min(tune.channel_max or 2047, 2047),
            frame_max=link.frame_max,
            heartbeat=link.heartbeat,
        ),
        0,
    )
    await link.rpc(spec.Connection.Open(virtual_host=vhost), 0, (spec.Connection.OpenOk,), timeout)
    link.start_heartbeats()


def parse_version(raw: object) -> tuple[int, ...]:
    """``(4, 1, 2)`` from a server's version property (bytes or text), never raising."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    parts = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts)
