"""gRPC servicer of chatmesh.chat.v1.ChatService: protobuf in, protobuf out, use cases in between."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime
from typing import Any, TypeAlias

from google.protobuf.timestamp_pb2 import Timestamp

from chat_service import validation as check
from chat_service.conversations import CompletionEvent, Conversations, Delta, Failed, Finished, Started
from chat_service.domain import Chat, ChatCursor, ChatUpdate, FinishReason, JobState, Message, Role
from chat_service.inference import ServedModels
from chat_service.jobs.service import Jobs, JobView
from chatmesh.chat.v1 import chat_pb2 as pb
from chatmesh.chat.v1 import chat_pb2_grpc
from chatmesh.common.auth import current_user
from chatmesh.common.errors import FailedPrecondition

# grpc.aio.ServicerContext; grpcio ships no type information.
Context: TypeAlias = Any

_STRATEGY_PB = {v: k for k, v in check.STRATEGIES.items()}
_ROLE_PB = {Role.USER: pb.ROLE_USER, Role.ASSISTANT: pb.ROLE_ASSISTANT}
_FINISH_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def chat_to_pb(chat: Chat, models: ServedModels) -> pb.Chat:
    """`chat` as the API shows it: its model is the one that answers its next turn (the default for a
    chat made before chats had models)."""
    return pb.Chat(
        chat_id=str(chat.id),
        title=chat.title,
        system_prompt=chat.system_prompt,
        history_strategy=_STRATEGY_PB[chat.history_strategy],
        create_time=_timestamp(chat.created_at),
        last_activity_time=_timestamp(chat.last_activity_at),
        model=models.of_chat(chat.model).model,
    )


def message_to_pb(message: Message) -> pb.ChatMessage:
    return pb.ChatMessage(
        message_id=str(message.id),
        role=_ROLE_PB[message.role],
        content=message.content,
        token_count=message.token_count,
        finish_reason=_FINISH_PB[message.finish_reason]
        if message.finish_reason
        else pb.FINISH_REASON_UNSPECIFIED,
        create_time=_timestamp(message.created_at),
        model=message.model or "",
    )


_JOB_STATE_PB = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
}


def job_to_pb(view: JobView) -> pb.Job:
    job = view.job
    return pb.Job(
        job_id=str(job.id),
        chat_id=str(job.request.chat_id),
        user_message_id=str(job.request.user_message_id),
        state=_JOB_STATE_PB[job.state],
        attempts=job.attempts,
        error=job.error or "",
        reply=message_to_pb(view.reply) if view.reply is not None else None,
        create_time=_timestamp(job.created_at),
        update_time=_timestamp(job.updated_at),
    )


def event_to_pb(event: CompletionEvent, models: ServedModels) -> pb.CompletionEvent:
    if isinstance(event, Delta):
        return pb.CompletionEvent(delta=event.text)
    if isinstance(event, Started):
        return pb.CompletionEvent(
            chat_id=str(event.chat_id),
            user_message_id=str(event.user_message_id) if event.user_message_id else "",
            chat=chat_to_pb(event.chat, models) if event.chat else None,
        )
    if isinstance(event, Finished):
        return pb.CompletionEvent(
            finish_reason=_FINISH_PB[event.finish_reason],
            usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
            assistant_message_id=str(event.assistant_message_id) if event.assistant_message_id else "",
            cached=event.cached,
        )
    assert isinstance(event, Failed)
    return pb.CompletionEvent(
        error=pb.StreamError(code=event.error.status_code.name, message=event.error.message)
    )


GATEWAY_REQUEST_ID_KEY = "x-request-id"
"""Envoy sets this header once per client request and keeps it on every retry of that request."""


def _request_id(
    request: pb.CreateChatRequest | pb.CompleteRequest | pb.SubmitCompletionRequest, context: Context
) -> str | None:
    """The caller's `request_id`, else the gateway's request id: Envoy retries a completion that a
    replica refused as RESOURCE_EXHAUSTED on another replica, and with the same id that replica
    continues the question the first one stored rather than storing it a second time."""
    if own := check.request_id(request.request_id):
        return own
    for key, value in context.invocation_metadata() or ():
        if key == GATEWAY_REQUEST_ID_KEY:
            return check.request_id(value if isinstance(value, str) else value.decode())
    return None


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Maps ChatService RPCs onto `Conversations`; identity comes from the auth interceptor."""

    def __init__(self, conversations: Conversations, jobs: Jobs | None = None) -> None:
        self._conversations = conversations
        self._models = conversations.models
        self._jobs = jobs

    def _job_service(self) -> Jobs:
        if self._jobs is None:
            raise FailedPrecondition(
                "asynchronous jobs are off on this deployment: the chat service needs a NATS JetStream"
                " server (CHATMESH_CHAT_JOBS_NATS_URL)"
            )
        return self._jobs

    async def CreateChat(
        self, request: pb.CreateChatRequest, context: Context
    ) -> AsyncIterator[pb.CompletionEvent]:
        user = current_user()
        model = self._models.resolve(request.model)
        events = self._conversations.create_chat(
            user,
            title=check.bounded_text(request.title, "title", check.MAX_TITLE_CHARS),
            system_prompt=check.bounded_text(
                request.system_prompt, "system_prompt", check.MAX_SYSTEM_PROMPT_CHARS
            ),
            strategy=check.strategy(request.history_strategy),
            first_message=check.content(request.content) if request.content else None,
            sampling=check.sampling(request, model.context_length),
            request_id=_request_id(request, context),
            use_cache=not request.skip_cache,
            model=model.model,
        )
        async with aclosing(events):
            async for event in events:
                yield event_to_pb(event, self._models)

    async def Complete(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncIterator[pb.CompletionEvent]:
        user = current_user()
        events = self._conversations.complete(
            user,
            check.chat_id(request.chat_id),
            check.content(request.content),
            # The chat's model is known once its turn starts, which checks max_tokens against its context.
            check.sampling(request, self._models.max_context_length),
            _request_id(request, context),
            use_cache=not request.skip_cache,
        )
        async with aclosing(events):
            async for event in events:
                yield event_to_pb(event, self._models)

    async def ListChats(self, request: pb.ListChatsRequest, context: Context) -> pb.ListChatsResponse:
        limit = check.page_size(request.page_size, check.DEFAULT_CHATS_PAGE, check.MAX_CHATS_PAGE)
        chats = await self._conversations.list_chats(
            current_user(), limit + 1, check.chat_cursor(request.page_token)
        )
        page = chats[:limit]
        token = ""
        if len(chats) > limit:
            token = check.chat_cursor_token(ChatCursor(page[-1].last_activity_at, page[-1].id))
        return pb.ListChatsResponse(chats=[chat_to_pb(c, self._models) for c in page], next_page_token=token)

    async def GetMessages(self, request: pb.GetMessagesRequest, context: Context) -> pb.GetMessagesResponse:
        limit = check.page_size(request.page_size, check.DEFAULT_MESSAGES_PAGE, check.MAX_MESSAGES_PAGE)
        messages = await self._conversations.messages(
            current_user(),
            check.chat_id(request.chat_id),
            limit + 1,
            check.message_cursor(request.page_token),
        )
        page = messages[:limit]
        token = check.message_cursor_token(page[-1].seq) if len(messages) > limit else ""
        return pb.GetMessagesResponse(messages=[message_to_pb(m) for m in page], next_page_token=token)

    async def UpdateChat(self, request: pb.UpdateChatRequest, context: Context) -> pb.UpdateChatResponse:
        update = ChatUpdate(
            title=check.bounded_text(request.title, "title", check.MAX_TITLE_CHARS)
            if request.HasField("title")
            else None,
            system_prompt=check.bounded_text(
                request.system_prompt, "system_prompt", check.MAX_SYSTEM_PROMPT_CHARS
            )
            if request.HasField("system_prompt")
            else None,
            history_strategy=check.strategy(request.history_strategy),
            model=request.model if request.HasField("model") else None,
        )
        chat = await self._conversations.update_chat(current_user(), check.chat_id(request.chat_id), update)
        return pb.UpdateChatResponse(chat=chat_to_pb(chat, self._models))

    async def DeleteChat(self, request: pb.DeleteChatRequest, context: Context) -> pb.DeleteChatResponse:
        await self._conversations.delete_chat(current_user(), check.chat_id(request.chat_id))
        return pb.DeleteChatResponse()

    async def ClearCache(self, request: pb.ClearCacheRequest, context: Context) -> pb.ClearCacheResponse:
        deleted = await self._conversations.clear_cache(current_user())
        return pb.ClearCacheResponse(deleted_entries=deleted)

    async def SubmitCompletion(self, request: pb.SubmitCompletionRequest, context: Context) -> pb.Job:
        jobs = self._job_service()
        view = await jobs.submit(
            current_user(),
            check.chat_id(request.chat_id),
            check.content(request.content),
            # The chat's model is known once its turn starts, which checks max_tokens against its context.
            check.sampling(request, self._models.max_context_length),
            _request_id(request, context),
            use_cache=not request.skip_cache,
        )
        return job_to_pb(view)

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.Job:
        view = await self._job_service().get(current_user(), check.job_id(request.job_id))
        return job_to_pb(view)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        current_user()
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=info.model,
                    context_length=info.context_length,
                    default_max_tokens=info.default_max_tokens,
                )
                for info in self._models.all
            ],
            default_model=self._models.default.model,
        )

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.CompletionEvent]:
        events = self._job_service().watch(current_user(), check.job_id(request.job_id))
        async with aclosing(events):
            async for event in events:
                yield event_to_pb(event, self._models)
