"""What ingestion says about each event of a batch: stored, a duplicate, or a rejection."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from worker.errors import Rejection


class Outcome(enum.Enum):
    """What happened to one valid event: stored, or a duplicate of a stored event with the
    same content (one with other content is a Rejection, ``conflicting_duplicate``)."""

    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestResult:
    """One entry per input event, in input order: an :class:`Outcome` or a Rejection."""

    outcomes: list[Outcome | Rejection]

    @property
    def stored(self) -> int:
        return sum(1 for o in self.outcomes if o is Outcome.STORED)

    @property
    def duplicates(self) -> int:
        return sum(1 for o in self.outcomes if o is Outcome.DUPLICATE)

    @property
    def rejected(self) -> list[tuple[int, Rejection]]:
        return [(i, o) for i, o in enumerate(self.outcomes) if isinstance(o, Rejection)]


#: The outcomes of one attempt at a batch's transaction, by the event's index in the batch,
#: kept until that transaction commits.
Settled = dict[int, Outcome | Rejection]
