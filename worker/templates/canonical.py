"""A template config's canonical JSON (RFC 8785) and its hash, and reading JSON so that
every number keeps the exact value it was written with.

Canonical form: the config fields that are not null, as one JSON object serialized by RFC
8785, the JSON Canonicalization Scheme (JCS, implemented by the ``rfc8785`` package): keys
sorted by their UTF-16 code units at every level, no insignificant whitespace, strings
UTF-8 with JCS's minimal escapes, numbers as ECMAScript prints the IEEE 754 double they
denote (``5.120e2``, ``512.0`` and ``512`` are all ``512``). ``config_hash`` is the SHA-256
hex digest of those bytes, so any service with a JCS library computes the same hash
(``docs/events.md`` has an example to check one against).

Numbers keep their exact value on the way in: template files are parsed by :func:`loads`
with integers as written (never through a double) and fractions as the nearest double,
which is what JCS reads them as. Beyond ±(2^53 - 1) not every integer has a double of its
own (I-JSON, RFC 7493, calls such numbers not interoperable), so JCS would hash another
number than the one written (``18446744073709551617`` as ``18446744073709552000``): such an
integer is refused, naming the field, rather than silently changed; a value that large
belongs in a string. ``NaN``, ``Infinity``, lone surrogates and duplicate keys, which JCS
has no form for (or which parsers disagree on), are refused too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, Final

import rfc8785

from worker import events as ev
from worker.errors import Rejection

#: The largest integer a JSON number holds exactly (RFC 8785 reads numbers as doubles).
MAX_EXACT_INTEGER: Final = 2**53 - 1


def canonical_json(config: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a config: its fields that are not null, by RFC 8785 (see the
    module docstring). A value JCS cannot hold exactly raises a :class:`Rejection`
    naming the field (:func:`check_json`)."""
    present = {k: v for k, v in config.items() if v is not None}
    check_json(present)
    return rfc8785.dumps(present)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(config)).hexdigest()


def check_json(value: object, path: str = "$") -> None:
    """Raise a :class:`Rejection` naming the first place (a JSON path) where ``value``
    holds what RFC 8785 cannot serialize exactly: an integer beyond
    ±:data:`MAX_EXACT_INTEGER`, a float that is NaN or infinite, a string with a lone
    surrogate, a key that is not a string, or something that is not JSON at all."""
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        node, where = stack.pop()
        if node is None or isinstance(node, bool):
            continue
        if isinstance(node, int):
            if abs(node) > MAX_EXACT_INTEGER:
                raise Rejection(
                    ev.INVALID_FIELD,
                    f'"{where}" is an integer beyond ±(2^53 - 1), which a JSON number cannot '
                    "hold exactly (canonical JSON, RFC 8785, reads numbers as doubles): "
                    "write it as a string",
                )
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise Rejection(ev.INVALID_FIELD, f'"{where}" is not a finite number')
        elif isinstance(node, str):
            if not _utf8(node):
                raise Rejection(ev.INVALID_FIELD, f'"{where}" holds a lone surrogate')
        elif isinstance(node, Mapping):
            for key in node:
                if not isinstance(key, str) or not _utf8(key):
                    raise Rejection(ev.INVALID_FIELD, f'"{where}" has a key that is not text')
            items = list(node.items())
            stack.extend((v, _child(where, k)) for k, v in reversed(items))
        elif isinstance(node, (list, tuple)):
            stack.extend((node[i], f"{where}[{i}]") for i in range(len(node) - 1, -1, -1))
        else:
            raise Rejection(ev.INVALID_FIELD, f'"{where}" is not a JSON value')


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _child(parent: str, key: str) -> str:
    return f"{parent}.{key}" if key.isidentifier() else f"{parent}[{json.dumps(key)}]"


def loads(data: bytes | str, *, as_doubles: bool = False) -> Any:
    """Parse JSON keeping each number's exact value: integers as written (Python ints,
    never through a double), fractions and exponents as the nearest double (what JCS reads
    them as). ``NaN``/``Infinity`` and duplicate keys are refused with a
    :class:`Rejection` (``invalid_json``), as is anything that is not JSON.

    ``as_doubles``: integers beyond ±:data:`MAX_EXACT_INTEGER` are read as doubles, as RFC
    8785 reads every number. For JSON that is already canonical (stored configs): JCS
    prints a large double such as ``1e16`` as ``10000000000000000``, which must read back
    as the same double, not be refused as a large integer."""
    parse_int = _int_or_double if as_doubles else int
    try:
        return json.loads(
            data,
            parse_int=parse_int,
            parse_constant=_no_constant,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8
        raise Rejection(ev.INVALID_JSON, f"not JSON: {exc}") from None


def _int_or_double(text: str) -> int | float:
    value = int(text)
    return value if abs(value) <= MAX_EXACT_INTEGER else float(text)


def _no_constant(name: str) -> Any:
    raise Rejection(ev.INVALID_JSON, f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Rejection(
                ev.INVALID_JSON, f"the key {json.dumps(key)} appears twice in an object"
            )
        out[key] = value
    return out
