"""What keeps secrets secret: the one masking rule of every output (:func:`mask_url`,
:func:`redact`), the checks a URL's credentials must pass, and the TLS policy
(:func:`tls_warnings`: what is sent in clear, or unverified, to a server that is not local).

No I/O but checking that the TLS files a URL names exist; no settings. :mod:`worker.config`
validates with it, :mod:`worker.logs` redacts every line with it, and every error or
status that names a server masks it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Final

#: libpq's sslmode values, weakest first. Only verify-full authenticates the server.
SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SSL_FILES: Final = ("sslrootcert", "sslcert", "sslkey", "sslcrl")


# Characters a URL's user-info cannot hold raw: each would end it, or its host, early.
_NOT_IN_USERINFO: Final = frozenset("@/?#[]\\ \t\r\n")
_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _check_userinfo(url: str, *, separator: str = "") -> None:
    """Refuse a URL whose user name or password (up to its *last* ``@``, the rule of
    :func:`mask_url`) holds a character that must be percent-encoded, or a ``%`` that starts
    no escape. A driver would cut such a URL elsewhere than the user meant, and print the
    pieces (a password's end as a host name, its start as a port) in its errors. The
    message never shows the user-info; ``separator`` (``,`` for a list of URLs) is refused
    too. The same rule refuses an ``@`` in a path or query, which must be written ``%40``:
    from the URL alone, it cannot be told from a password holding ``/``, ``?`` or ``#``."""
    rest = url.partition("://")[2]
    userinfo = rest[: max(rest.rfind("@"), 0)]
    if not (_NOT_IN_USERINFO | set(separator)) & set(userinfo) and not _ESCAPE.search(userinfo):
        return
    comma = ", a comma as %2C" if "," in separator else ""
    raise ValueError(
        f"the user name or password in {mask_url(url)} holds a character that must be "
        "percent-encoded (@ as %40, / as %2F, ? as %3F, # as %23, [ ] as %5B %5D, \\ as %5C, "
        f"a space as %20{comma}, a % that starts no escape as %25); so must an @ in the path "
        "or query"
    )


def check_database_url(raw: str) -> str:
    value = raw.strip()
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(
            f"must be a postgresql:// URL, got scheme {parts.scheme!r} in {mask_url(value)}"
        )
    _check_userinfo(value)
    query = dict(urllib.parse.parse_qsl(parts.query))
    mode = query.get("sslmode")
    if mode is not None and mode not in SSL_MODES:
        raise ValueError(f"sslmode must be one of {', '.join(SSL_MODES)}, got {mode!r}")
    for name in _SSL_FILES:
        path = query.get(name)
        if path is not None and not os.path.isfile(os.path.expanduser(path)):
            raise ValueError(f"{name} {path!r} is not a readable file")
    return value


def _hosts(netloc: str, query: Mapping[str, str]) -> list[str]:
    """The host names of a libpq URL (several, comma-separated, are allowed)."""
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host = part.rsplit(":", 1)[0] if part.count(":") == 1 or "]" in part else part
        hosts.append(host.strip("[]"))
    if "host" in query:
        hosts = query["host"].split(",")
    return [h for h in hosts if h]


def _is_local(host: str) -> bool:
    """A Unix socket directory, or a loopback address: nothing on the wire to protect."""
    if host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_warnings(database_url: str, amqp_url: str, environ: Mapping[str, str]) -> list[str]:
    """Why the connections to a remote server would not be encrypted or authenticated.

    PostgreSQL: anything but ``sslmode=verify-full`` toward a host that is not local
    (asyncpg, like libpq, defaults to ``prefer``: encryption without checking who answers,
    and plain text if the server offers nothing better). RabbitMQ: ``amqp://`` toward a host
    that is not local. (``amqps://`` with ``no_verify_ssl`` is warned about by the broker
    module when it connects.) The messages name hosts, never credentials.
    """
    out = []
    parts = urllib.parse.urlsplit(database_url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    remote = [h for h in _hosts(parts.netloc, query) if not _is_local(h)]
    mode = query.get("sslmode") or environ.get("PGSSLMODE") or "prefer"
    if remote and mode != "verify-full":
        issuer_only = mode == "verify-ca" or (mode == "require" and "sslrootcert" in query)
        if issuer_only:
            why = "checks the certificate's issuer, not that it names the host"
        elif mode == "require":
            why = "encrypts, but does not check who answers"
        else:
            why = "may send the password and every event in plain text, to anyone"
        out.append(
            f"DATABASE_URL: sslmode={mode} toward {', '.join(remote)} {why}; "
            "set sslmode=verify-full and sslrootcert=<CA file> (see docs/security.md)"
        )
    for url in split_urls(amqp_url):
        amqp = urllib.parse.urlsplit(url)
        host = amqp.hostname or ""
        if amqp.scheme == "amqp" and host and not _is_local(host):
            out.append(
                f"AMQP_URL: amqp:// toward {host} sends the password and every event in plain "
                "text; use amqps:// (see docs/security.md)"
            )
    return out


def check_amqp_url(raw: str) -> str:
    urls = split_urls(raw)
    if not urls:
        raise ValueError("must name at least one amqp:// or amqps:// URL")
    # The user-info of each URL as masking reads it: a password holding `,amqp://` is one
    # URL to mask_url, but two nodes to split_urls, the first printing the password's start.
    for url in _masked_parts(urls):
        _check_userinfo(url, separator=",")  # commas separate the nodes of a cluster
    for url in urls:
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("amqp", "amqps"):
            raise ValueError(f"must be an amqp:// or amqps:// URL, got {mask_url(url)}")
    return ",".join(urls)


# A URL starts at its scheme; a comma separates two URLs of a list only where a scheme
# follows it. Commas elsewhere belong to their URL: a password's, a libpq host list's.
_SCHEME: Final = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://")
_NEXT_URL: Final = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_PASSWORD_PAIR: Final = re.compile(
    r"(?i)(?P<head>\b(?:ssl)?password[\"']?\s*[=:]\s*[\"']?)(?P<value>[^\s&\"']+)"
)
MASK: Final = "***"


def split_urls(text: str) -> list[str]:
    """The URLs of a comma-separated list (``AMQP_URL`` of a cluster), each stripped.

    A comma ends a URL only where another scheme (``amqp://``) follows it, so a comma in a
    password, or in a libpq host list (``postgresql://u:p@h1,h2/db``), stays in its URL.
    """
    return [u.strip() for u in _NEXT_URL.split(text) if u.strip()]


def mask_url(url: str) -> str:
    """``url`` (one URL, or a comma-separated list) with every password replaced by ``***``.

    The one masking rule of every output (status, errors, the settings' repr, and every log
    line through :func:`redact`): in each URL, the user-info runs from ``://`` to the
    URL's *last* ``@``, and all of it after the first ``:`` is masked, whatever it holds
    (``,`` ``#`` ``/`` ``?`` ``@`` ``:`` ``%``, raw or percent-encoded: a password pasted raw
    is not a valid URL, but it must not be printed either). ``password=`` and
    ``sslpassword=`` pairs are masked too. A URL is never parsed here, so nothing that
    fails to parse can slip through.
    """
    return _mask_pairs(",".join(_mask_userinfo(part) for part in _masked_parts(split_urls(url))))


def redact(text: str) -> str:
    """Free text (a log line, a driver's error) with the password of every URL in it, and
    every ``password=`` pair, masked by the rule of :func:`mask_url`. In free text a URL
    ends at whitespace or where the next URL's scheme starts."""
    if "://" in text:
        out: list[str] = []
        last = 0
        starts = _url_starts(text, [m.start() for m in _SCHEME.finditer(text)])
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(text)
            space = re.search(r"\s", text[start:stop])
            end = start + space.start() if space else stop
            out.append(text[last:start])
            out.append(_mask_userinfo(text[start:end]))
            last = end
        out.append(text[last:])
        text = "".join(out)
    return _mask_pairs(text)


# After ``://`` and before any ``@``: a host, a ``:port`` and maybe a path, a query or a comma
# (the end of a URL of a list). Anything else after a ``:`` is a password still going on.
_PORT_OR_HOST: Final = re.compile(r"[^:@\s]*(?::\d+(?:[/?,][^@\s]*)?)?,?\s*")


def _in_userinfo(segment: str) -> bool:
    """Whether ``segment`` (a URL's text up to what looks like the next URL's scheme) stops
    inside a password: ``amqp://user:k`` before ``://k@host`` is one URL whose password holds
    ``k://k``, not two URLs. When in doubt the two are read as one and masked together: a
    host hidden by mistake costs less than a password printed."""
    _, sep, rest = segment.partition("://")
    return bool(sep) and "@" not in rest and not _PORT_OR_HOST.fullmatch(rest)


def _masked_parts(parts: list[str]) -> list[str]:
    """The URLs of a list as masking reads them: a part that ends inside a password is
    joined with the next one (see :func:`_in_userinfo`)."""
    out: list[str] = []
    for part in parts:
        if out and _in_userinfo(out[-1]):
            out[-1] = f"{out[-1]},{part}"
        else:
            out.append(part)
    return out


def _url_starts(text: str, starts: list[int]) -> list[int]:
    """The starts of the URLs in free text: a scheme found inside the password of the URL
    before it (``amqp://user:k://k@host``) starts nothing. Whitespace always ends a URL."""
    kept: list[int] = []
    for start in starts:
        segment = text[kept[-1] : start] if kept else ""
        if segment and not re.search(r"\s", segment) and _in_userinfo(segment):
            continue
        kept.append(start)
    return kept


def _mask_userinfo(url: str) -> str:
    """One URL with everything between its user name and its last ``@`` masked."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    return f"{scheme}://{user}{':' + MASK if colon else ''}{rest[at:]}"


def _mask_pairs(text: str) -> str:
    if "assword" not in text and "ASSWORD" not in text:
        return text
    return _PASSWORD_PAIR.sub(rf"\g<head>{MASK}", text)
