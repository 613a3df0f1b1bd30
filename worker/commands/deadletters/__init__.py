"""The dead-letter queue: ``dead-letters list | redrive | purge``, reading the queue with
a consumer that takes only what it is told to.

``letters`` describes one dead letter; ``reading`` reads the queue without consuming it;
``listing`` lists; ``scan`` walks a selection for ``redriving`` and ``purging``. Every name
below is imported from ``worker.commands.deadletters`` itself.
"""

from worker.commands.deadletters.letters import REDRIVE_COUNT, DeadLetter, describe
from worker.commands.deadletters.listing import (
    DEFAULT_LIST_LIMIT,
    Listing,
    list_dead_letters,
    render_listing,
)
from worker.commands.deadletters.purging import purge, purge_selected
from worker.commands.deadletters.reading import IDLE_SECONDS, depth
from worker.commands.deadletters.redriving import (
    DEAD_LETTER_HEADERS,
    DEFAULT_CONFIRM_TIMEOUT,
    redrive,
    redriven_header,
)
from worker.commands.deadletters.scan import (
    DEFAULT_WINDOW,
    MAX_HELD_BACK,
    RedriveReport,
    Selection,
    render_redrive,
)

__all__ = [
    "DEAD_LETTER_HEADERS",
    "DEFAULT_CONFIRM_TIMEOUT",
    "DEFAULT_LIST_LIMIT",
    "DEFAULT_WINDOW",
    "IDLE_SECONDS",
    "MAX_HELD_BACK",
    "REDRIVE_COUNT",
    "DeadLetter",
    "Listing",
    "RedriveReport",
    "Selection",
    "depth",
    "describe",
    "list_dead_letters",
    "purge",
    "purge_selected",
    "redrive",
    "redriven_header",
    "render_listing",
    "render_redrive",
]
