"""What every command shares: settings as flags (:func:`settings_options`), running a
coroutine with a clean exit, the broker settings and the confirm window of every command
that publishes. Light on imports, so that ``--help`` stays fast."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import uuid
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from worker import logs, tracing
from worker.config import Settings
from worker.errors import ConfigError, SchemaError, WorkerError

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(*names: str) -> Callable[[F], F]:
    """Add one ``--flag`` per named setting; the command receives ``settings: Settings``."""
    by_name = {f.name: f for f in Settings.fields()}

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            overrides = {name: kwargs.pop(name) for name in names}
            try:
                settings = Settings.from_env(**overrides)
                logs.configure(settings.log_level, settings.log_format)
                tracing.setup()  # only if OTEL_* asks for it (worker.tracing)
            except ConfigError as exc:
                raise click.UsageError(str(exc)) from None
            return func(*args, settings=settings, **kwargs)

        for name in reversed(names):
            f = by_name[name]
            default = f.default
            flag = name.replace("_", "-")
            if isinstance(default, bool):
                shown = f" [default: {'--' if default else '--no-'}{flag}]"
                decls = [f"--{flag}/--no-{flag}", name]
                metavar = None
            else:
                shown = "" if f.metadata["secret"] else f" [default: {default}]"
                decls = [f"--{flag}", name]
                metavar = "NUMBER" if isinstance(default, (int, float)) else "TEXT"
            wrapper = click.option(
                *decls,
                default=None,
                metavar=metavar,
                help=f"{f.metadata['help']}{shown} [env: {f.metadata['env']}]",
            )(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def run_async(coro: Any) -> Any:
    """Run a coroutine, turning the worker's own errors into a clean exit with a message
    (exit 2 for a schema the command cannot run on)."""
    try:
        return asyncio.run(coro)
    except SchemaError as exc:
        exit_2(exc)
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from None


def exit_2(exc: BaseException) -> NoReturn:
    """One line on stderr and exit 2; the traceback only at --log-level debug."""
    logging.getLogger("worker.cli").debug("failed", exc_info=exc)
    click.echo(f"Error: {exc}", err=True)
    sys.exit(2)


def check_uuid(value: str, name: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID", param_hint=name) from None


#: Settings of every command that publishes (the topology is declared, or checked, first).
BROKER_SETTINGS = (
    "amqp_url",
    "exchange",
    "queue",
    "replay_queue",
    "dead_letter_exchange",
    "dead_letter_queue",
    "delivery_limit",
    "declare",
    "log_level",
    "log_format",
)
# The publisher's default, repeated: its module is imported only when a command runs (so
# --help stays fast); tests/test_backfill_cli.py checks that they agree.
DEFAULT_WINDOW = 256

window_option = click.option(
    "--window",
    type=click.IntRange(1, 65_535),
    default=DEFAULT_WINDOW,
    show_default=True,
    help="Messages awaiting their broker confirm at once.",
)
