"""``dead-letters list``: the first messages of the dead-letter queue, described, none
removed; and their text rendering."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from worker.commands.deadletters.letters import DeadLetter, describe
from worker.commands.deadletters.reading import reading
from worker.config import Settings

DEFAULT_LIST_LIMIT: Final = 1000


@dataclass(kw_only=True)
class Listing:
    queue: str
    depth: int  # messages in the queue when listing began
    messages: list[DeadLetter] = field(default_factory=list)

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(Counter(m.reason for m in self.messages).most_common())

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "depth": self.depth,
            "listed": len(self.messages),
            "by_reason": self.by_reason,
            "messages": [m.as_dict() for m in self.messages],
        }


async def list_dead_letters(settings: Settings, *, limit: int = DEFAULT_LIST_LIMIT) -> Listing:
    """The first ``limit`` messages of the dead-letter queue (at most 65,535), described;
    none is removed."""
    limit = min(limit, 65_535)
    async with reading(settings, "prompter-worker dead-letters list", prefetch=limit) as reader:
        listing = Listing(queue=settings.dead_letter_queue, depth=reader.depth)
        while len(listing.messages) < min(limit, reader.depth):
            delivery = await reader.next()
            if delivery is None:
                break
            listing.messages.append(describe(delivery))
            delivery.body = b""  # only what it says about itself is kept
    return listing


def render_listing(listing: Listing) -> str:
    lines = [f"{'event_id / key':36}  {'reason':26}  {'failed at':25}  detail"]
    for m in listing.messages:
        lines.append(
            f"{(m.event_id or m.key)[:36]:36}  {m.reason[:26]:26}  {(m.failed_at or '-')[:25]:25}"
            f"  {m.detail}"
        )
    shown = len(listing.messages)
    more = f" (the first {shown:,} listed)" if shown < listing.depth else ""
    lines.append(f"{listing.depth:,} messages in {listing.queue}{more}")
    if listing.messages:
        lines.append("by reason: " + ", ".join(f"{r} {n:,}" for r, n in listing.by_reason.items()))
    return "\n".join(lines)
