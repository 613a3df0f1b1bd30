"""The consuming channels' prefetch counts, following the average message size: the
broker never hands the worker far more than its byte budget (``PROMPTER_MAX_HELD_BYTES``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from worker.amqp import protocol as amqp
from worker.config import Settings
from worker.ingest.acks import Source

#: A new prefetch count is sent only when it differs from the current one by this share.
PREFETCH_STEP: Final = 0.25
#: Weight of the newest batch in the running average of message sizes.
SIZE_SMOOTHING: Final = 0.2


class Prefetch:
    """The prefetch count of each consuming channel: the configured one (live queue,
    replay queue), lowered to the budget's worth of messages of the average size."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.average_size = 0.0
        self.by_channel: dict[int, int] = {}

    def configured(self) -> tuple[int, int]:
        """The live queue's and the replay queue's configured prefetch counts."""
        return self.settings.prefetch, self.settings.replay_prefetch

    def scaled(self, configured: int) -> int:
        """The prefetch for the average message size: at most the budget's worth."""
        if self.average_size <= 0:
            return configured
        fits = int(self.settings.max_held_bytes // self.average_size)
        return max(1, min(configured, fits))

    def opened(self, channel: int, configured: int) -> int:
        """The prefetch count to open ``channel`` with (remembered as its current one)."""
        value = self.by_channel[channel] = self.scaled(configured)
        return value

    def adapt(
        self, sizes: list[int], consumer: amqp.Connection | None, sources: Sequence[Source]
    ) -> None:
        """Fold a batch's message sizes into the average; on a connection still open, send
        a channel a new prefetch count when it moved by more than :data:`PREFETCH_STEP`."""
        if not sizes:
            return
        size = sum(sizes) / len(sizes)
        if self.average_size <= 0:
            self.average_size = size
        else:
            self.average_size += SIZE_SMOOTHING * (size - self.average_size)
        if consumer is None or consumer.closed.done():
            return
        for source, configured in zip(sources, self.configured(), strict=True):
            wanted = self.scaled(configured)
            current = self.by_channel.get(source.channel, configured)
            if abs(wanted - current) > PREFETCH_STEP * current:
                consumer.set_prefetch(source.channel, wanted)
                self.by_channel[source.channel] = wanted
