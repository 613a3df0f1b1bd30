"""Settings: one frozen value, read from the environment and overridden by CLI flags.

Every setting is declared once, in :class:`Settings`, with its environment variable, its
flag and its help. The CLI builds its options from these declarations and the README's
table is checked against them by a test, so the three never drift apart.

No I/O here beyond ``os.environ`` and the ``*_FILE`` secret files it names.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import click

from worker.errors import ConfigError
from worker.security import check_amqp_url, check_database_url, mask_url, tls_warnings

log = logging.getLogger(__name__)

MIB: Final = 1_048_576
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/prompter"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: Variables that may hold credentials, readable from a file named by ``<NAME>_FILE``.
SECRET_VARIABLES = ("DATABASE_URL", "AMQP_URL")

Parser = Callable[[str], Any]


def _typed(*kinds: click.ParamType[Any]) -> Parser:
    """A parser from click's types (the flags' own), applied in turn: their conversions,
    and their message when a value is refused."""

    def parse(raw: str) -> Any:
        value: Any = raw.strip()
        try:
            for kind in kinds:
                value = kind.convert(value, None, None)
        except click.BadParameter as exc:
            raise ValueError(exc.message) from None
        return value

    return parse


def _int_range(low: int, high: int) -> Parser:
    return _typed(click.INT, click.IntRange(low, high))


def _float_range(low: float, high: float) -> Parser:
    within = _typed(click.FLOAT, click.FloatRange(low, high))

    def parse(raw: str) -> float:
        value: float = within(raw)
        if math.isnan(value):  # FloatRange lets NaN through: every comparison with it is false
            raise ValueError(f"{raw.strip()!r} is not a number")
        return value

    return parse


_bool: Final = _typed(click.BOOL)


def _choice(*choices: str) -> Parser:
    return _typed(click.Choice(choices, case_sensitive=False))


def _name(raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > 255:
        raise ValueError("must be a non-empty name of at most 255 characters")
    return value


def setting(default: Any, env: str, help: str, parse: Parser, *, secret: bool = False) -> Any:
    """Declare one setting: its default, environment variable, help text and parser."""
    return field(
        default=default,
        metadata={"env": env, "help": help, "parse": parse, "secret": secret},
    )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the worker and its commands can be told, validated."""

    database_url: str = setting(
        DEFAULT_DATABASE_URL,
        "DATABASE_URL",
        "PostgreSQL URL (libpq style; sslmode and sslrootcert pass through).",
        check_database_url,
        secret=True,
    )
    amqp_url: str = setting(
        DEFAULT_AMQP_URL,
        "AMQP_URL",
        "RabbitMQ URL; several comma-separated URLs name the nodes of a cluster.",
        check_amqp_url,
        secret=True,
    )
    exchange: str = setting(
        "prompter.events", "PROMPTER_EXCHANGE", "Topic exchange events are published to.", _name
    )
    queue: str = setting(
        "prompter.ingest", "PROMPTER_QUEUE", "Live queue (bound with prompt_run.*).", _name
    )
    replay_queue: str = setting(
        "prompter.ingest.replay",
        "PROMPTER_REPLAY_QUEUE",
        "Backfill queue (bound with prompt_run.*.replay).",
        _name,
    )
    dead_letter_exchange: str = setting(
        "prompter.dlx", "PROMPTER_DEAD_LETTER_EXCHANGE", "Dead-letter exchange.", _name
    )
    dead_letter_queue: str = setting(
        "prompter.ingest.dead", "PROMPTER_DEAD_LETTER_QUEUE", "Dead-letter queue.", _name
    )
    delivery_limit: int = setting(
        20,
        "PROMPTER_DELIVERY_LIMIT",
        "Deliveries before the broker dead-letters a message that keeps failing.",
        _int_range(1, 1_000_000),
    )
    declare: bool = setting(
        True,
        "PROMPTER_DECLARE",
        "Declare the topology at start; false checks it passively (an admin owns it).",
        _bool,
    )
    prefetch: int = setting(
        2000,
        "PROMPTER_PREFETCH",
        "Unacked deliveries held from the live queue.",
        _int_range(1, 65535),
    )
    replay_prefetch: int = setting(
        500,
        "PROMPTER_REPLAY_PREFETCH",
        "Unacked deliveries held from the replay queue (its smaller share).",
        _int_range(1, 65535),
    )
    batch_size: int = setting(
        500, "PROMPTER_BATCH_SIZE", "Most events written in one transaction.", _int_range(1, 10000)
    )
    batch_wait_ms: int = setting(
        5,
        "PROMPTER_BATCH_WAIT_MS",
        "Longest wait for a batch to fill before it is written anyway.",
        _int_range(0, 60_000),
    )
    max_event_bytes: int = setting(
        16 * MIB,
        "PROMPTER_MAX_EVENT_BYTES",
        "Largest event body accepted (RabbitMQ 4's default message size limit); larger "
        "ones are refused unread and dead-lettered by the broker.",
        _int_range(256, 128 * MIB),
    )
    max_held_bytes: int = setting(
        64 * MIB,
        "PROMPTER_MAX_HELD_BYTES",
        "Bytes of messages the worker holds at most (received, not yet acked); it stops "
        "reading from the broker at this mark. At least twice PROMPTER_MAX_EVENT_BYTES.",
        _int_range(MIB, 64 * 1024 * MIB),
    )
    # 4 MiB, not 8: the decoded copies of the batches in flight are what a worker holds
    # beyond its budget; measured (bench/README.md, "Peak RSS"): 310-324 to 224 MiB on the
    # size mix, 270-278 to 178 MiB on 1 MiB events, for 0-10% of the rate.
    batch_max_bytes: int = setting(
        4 * MIB,
        "PROMPTER_BATCH_MAX_BYTES",
        "Most bytes of events written in one transaction (a larger single event goes alone).",
        _int_range(64 * 1024, 64 * 1024 * MIB),
    )
    max_future_seconds: float = setting(
        86_400.0,
        "PROMPTER_MAX_FUTURE_SECONDS",
        "How far in the future occurred_at and fingerprint_captured_at may lie.",
        _float_range(0, 10 * 365 * 86_400),
    )
    db_pool_size: int = setting(
        2, "PROMPTER_DB_POOL_SIZE", "PostgreSQL connections per worker process.", _int_range(1, 100)
    )
    statement_cache_size: int = setting(
        100,
        "PROMPTER_STATEMENT_CACHE_SIZE",
        "asyncpg prepared-statement cache; 0 behind PgBouncer in transaction mode.",
        _int_range(0, 10_000),
    )
    retry_max_seconds: float = setting(
        30.0,
        "PROMPTER_RETRY_MAX_SECONDS",
        "Cap of the exponential backoff between retries of a transient fault.",
        _float_range(0.1, 3600),
    )
    shutdown_timeout: float = setting(
        30.0,
        "PROMPTER_SHUTDOWN_TIMEOUT",
        "Seconds a stopping worker may take to finish its batch and close.",
        _float_range(0.5, 3600),
    )
    metrics_port: int = setting(
        0,
        "PROMPTER_METRICS_PORT",
        "Port of /metrics, /healthz and /readyz; 0 turns the server off.",
        _int_range(0, 65535),
    )
    metrics_host: str = setting(
        "127.0.0.1", "PROMPTER_METRICS_HOST", "Address the metrics server listens on.", _name
    )
    log_summary_seconds: float = setting(
        60.0,
        "PROMPTER_LOG_SUMMARY_SECONDS",
        "Seconds between the worker's summary lines (stored, rejected, retries, rates), "
        "written only when something happened; 0 turns them off.",
        _float_range(0, 86_400),
    )
    log_level: str = setting(
        "info",
        "PROMPTER_LOG_LEVEL",
        "Log level.",
        _choice("debug", "info", "warning", "error"),
    )
    log_format: str = setting(
        "auto",
        "PROMPTER_LOG_FORMAT",
        "Log format: json, text, or auto (text on a terminal, JSON otherwise).",
        _choice("auto", "json", "text"),
    )

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        return dataclasses.fields(cls)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``), then apply ``overrides``.

        Overrides are values already typed (from CLI flags); ``None`` means "not given".
        Raises :class:`ConfigError` listing every invalid setting, each named by its
        environment variable and flag.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in cls.fields():
            meta = f.metadata
            name = meta["env"]
            flag = "--" + f.name.replace("_", "-")
            try:
                override = overrides.pop(f.name, None)
                if override is not None:
                    is_text = isinstance(override, str)
                    values[f.name] = meta["parse"](override) if is_text else override
                    continue
                raw = _read_variable(env, name, secret=meta["secret"])
                if raw is not None:
                    values[f.name] = meta["parse"](raw)
            except ValueError as exc:
                problems.append(f"{name} ({flag}): {exc}")
        if overrides:
            problems.append(f"unknown settings: {', '.join(sorted(overrides))}")
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        settings = cls(**values)
        settings.check()
        for warning in tls_warnings(settings.database_url, settings.amqp_url, env):
            log.warning(warning)
        return settings

    def check(self) -> None:
        """Cross-field rules, and warnings about settings that weaken security."""
        problems: list[str] = []
        if self.queue == self.replay_queue:
            problems.append("PROMPTER_QUEUE and PROMPTER_REPLAY_QUEUE must differ")
        if self.dead_letter_queue in (self.queue, self.replay_queue):
            problems.append("PROMPTER_DEAD_LETTER_QUEUE must differ from the ingest queues")
        if self.batch_size > self.prefetch:
            problems.append(
                f"PROMPTER_BATCH_SIZE ({self.batch_size}) must not exceed PROMPTER_PREFETCH "
                f"({self.prefetch}): a batch could never fill"
            )
        if self.max_held_bytes < 2 * self.max_event_bytes:
            problems.append(
                f"PROMPTER_MAX_HELD_BYTES ({self.max_held_bytes}) must be at least twice "
                f"PROMPTER_MAX_EVENT_BYTES ({self.max_event_bytes}): one event must fit while "
                "the previous batch is written"
            )
        if self.batch_max_bytes > self.max_held_bytes:
            problems.append(
                f"PROMPTER_BATCH_MAX_BYTES ({self.batch_max_bytes}) must not exceed "
                f"PROMPTER_MAX_HELD_BYTES ({self.max_held_bytes})"
            )
        if self.dead_letter_exchange == self.exchange:
            problems.append("PROMPTER_DEAD_LETTER_EXCHANGE must differ from PROMPTER_EXCHANGE")
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict, with every credential masked: safe to log or print."""
        out: dict[str, Any] = {}
        for f in self.fields():
            value = getattr(self, f.name)
            out[f.name] = mask_url(value) if f.metadata["secret"] else value
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({inner})"


def _read_variable(env: Mapping[str, str], name: str, *, secret: bool) -> str | None:
    value = env.get(name)
    if not secret:
        return value
    path = env.get(name + "_FILE")
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    try:
        with open(path, encoding="utf-8") as fh:
            content = fh.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {name}_FILE {path!r}: {exc.strerror}") from None
    if not content:
        raise ValueError(f"{name}_FILE {path!r} is empty")
    return content


def database_url_from_env(environ: Mapping[str, str] | None = None) -> str:
    """Only ``DATABASE_URL`` (or ``DATABASE_URL_FILE``), validated: what migrations need."""
    env = os.environ if environ is None else environ
    try:
        raw = _read_variable(env, "DATABASE_URL", secret=True)
        return check_database_url(raw) if raw is not None else DEFAULT_DATABASE_URL
    except ValueError as exc:
        raise ConfigError(f"DATABASE_URL: {exc}") from None


def asyncpg_dsn(url: str) -> str:
    """The URL as asyncpg takes it: SQLAlchemy's ``postgresql+asyncpg://`` is mapped back."""
    scheme, sep, rest = url.partition("://")
    if sep and "+" in scheme:
        return f"{scheme.split('+', 1)[0]}://{rest}"
    return url
