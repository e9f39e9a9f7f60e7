"""The chat use cases: durable, idempotent, streamed completions over a conversation store.

`Conversations` (service.py) is what the servicers and the job worker call; it composes pieces that each
do one job:

- events.py: the events of a completion stream (`Started`, `Delta`, `Finished`, `Failed`);
- in_flight.py: completions running in this process, which a retry or a watcher joins;
- leases.py: cross-replica leases on generating a reply (also taken by the job worker).
"""

from chat_service.conversations.events import (
    CompletionEvent,
    Delta,
    Failed,
    Finished,
    Started,
    stored_reply_events,
)
from chat_service.conversations.service import Conversations

__all__ = [
    "CompletionEvent",
    "Conversations",
    "Delta",
    "Failed",
    "Finished",
    "Started",
    "stored_reply_events",
]
