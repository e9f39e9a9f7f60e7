"""The chat use cases: durable, idempotent, streamed completions over a conversation store.

`Conversations` (service.py) is what the servicers and the job worker call. It holds a turn's steps
together (the user's completion slot, storing the question, joining a running completion, the cache
step, generation) and leaves each to a piece with one job:

- events.py: the events of a completion stream (`Started`, `Delta`, `Finished`, `Failed`);
- in_flight.py: completions running in this process, which a retry or a watcher joins;
- leases.py: cross-replica leases on generating a reply (also taken by the job worker);
- cache_step.py: the semantic cache in front of an answer, one step for chats and stateless answers;
- generation.py: a chat's reply from the engine, streamed and stored (or its part, when abandoned);
- token_counts.py: a question's token count, taken beside its turn;
- stateless.py: the stateless answer of the OpenAI-compatible API;
- futures.py: work started beside a turn that may not be needed.

The composition root (chat_service/server.py) builds `Conversations`; it builds its pieces.
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
