"""Where the worker's own AMQP connection goes: a broker URL read exactly as aiormq reads
it (host, vhost, credentials, heartbeat, EXTERNAL auth, TLS files), and its TLS context."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from yarl import URL

DEFAULT_PORTS: Final = {"amqp": 5672, "amqps": 5671}


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """One broker URL, read exactly as aiormq reads it (host, port, vhost, credentials, and
    the query: ``heartbeat``, ``auth``, ``cafile``, ``capath``, ``cadata``, ``certfile``,
    ``keyfile``, ``no_verify_ssl``), so the worker's two kinds of connection to a node
    agree on everything (tests/test_amqp.py checks it against aiormq)."""

    host: str
    port: int
    tls: bool
    user: str
    password: str
    vhost: str
    heartbeat: int | None
    external: bool
    cafile: str | None
    capath: str | None
    cadata: bytes | None
    certfile: str | None
    keyfile: str | None
    verify: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parsed = URL(url)
        scheme = parsed.scheme
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"not an amqp:// or amqps:// URL (scheme {scheme!r})")
        query = parsed.query
        path = parsed.path
        vhost = "/" if path in ("/", "") else path[1:].replace("%2F", "/")
        heartbeat = query.get("heartbeat")
        cadata = query.get("cadata")
        return cls(
            host=parsed.host or "localhost",
            port=parsed.port or DEFAULT_PORTS[scheme],
            tls=scheme == "amqps",
            user=parsed.user if parsed.user is not None else "guest",
            password=parsed.password if parsed.password is not None else "guest",
            vhost=vhost,
            heartbeat=None if heartbeat is None else _heartbeat(heartbeat),
            external=query.get("auth", "plain").upper() == "EXTERNAL",
            cafile=query.get("cafile"),
            capath=query.get("capath"),
            cadata=base64.b64decode(cadata) if cadata else None,
            certfile=query.get("certfile"),
            keyfile=query.get("keyfile"),
            verify=not verification_disabled(query),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (``amqps``), built as aiormq builds it; None for ``amqp``."""
        if not self.tls:
            return None
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=self.cafile, capath=self.capath, cadata=self.cadata
        )
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _heartbeat(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        return 0
    return value if 0 <= value < 65535 else 0


def verification_disabled(query: Mapping[str, str]) -> bool:
    """Whether an AMQP URL's query turns certificate verification off: ``no_verify_ssl``
    set to anything but ``0``, as aiormq reads it."""
    return query.get("no_verify_ssl", "0") != "0"
