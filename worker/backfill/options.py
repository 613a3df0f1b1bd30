"""What one ``publish`` or ``replay`` run is asked to do: :class:`ReplayOptions`, built once
by the command line (:mod:`worker.commands.backfill_cli`) and passed down unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from worker.amqp import broker
from worker.publisher import DEFAULT_WINDOW

DEFAULT_BATCH_SIZE: Final = 1000
DEFAULT_CONCURRENCY: Final = 2
DEFAULT_REJECTS_PATH: Final = "prompter-rejects.jsonl"

#: ``publish`` (live routing key), ``replay`` (replay routing key), ``direct`` (the store).
Mode: TypeAlias = Literal["publish", "replay", "direct"]


@dataclass(frozen=True, kw_only=True)
class ReplayOptions:
    """One run's options, the sink's own included (those of the other sink are ignored).

    ``paths`` are read in order (``-`` is stdin, at most once). Through the broker,
    ``window`` confirms are awaited at once; with ``mode="direct"``, ``concurrency``
    transactions of at most ``batch_size`` events each are in flight.
    """

    paths: Sequence[str]
    mode: Mode = "replay"
    dry_run: bool = False  # validate and report; send and store nothing
    checkpoint_path: str | None = None  # settled lines are recorded here; a re-run resumes
    force: bool = False  # resume a file changed since its checkpoint
    rejects_path: str | None = None  # refused lines are appended here (the command line
    # gives DEFAULT_REJECTS_PATH with --direct: the store can refuse what the contract took)
    rate: float | None = None  # events per second at most (paced), None: no limit
    progress: bool = False  # draw a bar on stderr
    window: int = DEFAULT_WINDOW
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(self.paths))  # a list given stays unshared

    @property
    def direct(self) -> bool:
        """Straight into the database (``replay --direct``), not through the broker."""
        return self.mode == "direct"

    @property
    def routing_key(self) -> str:
        """``publish`` goes where live events go; ``replay`` to its own queue."""
        return broker.LIVE_ROUTING_KEY if self.mode == "publish" else broker.REPLAY_ROUTING_KEY

    @property
    def connection_name(self) -> str:
        """The broker connection's name, as the management UI shows it."""
        return f"prompter-worker {self.mode}"
