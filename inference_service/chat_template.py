"""A GGUF's own chat template (`tokenizer.chat_template`, Jinja), turned into a `PromptTemplate`.

Instruction-tuned models carry the template they were trained with. llama.cpp renders it with a Jinja
engine; here it is rendered in Jinja's sandbox (no attribute access to Python internals, no I/O) on probe
conversations, and the per-role formats are read off the output: what a user message becomes, what an
assistant message adds after it, the cue that asks for the assistant's reply. That keeps the service's
contract (each message tokenized on its own, so one CountTokens call prices any sub-list of the messages).
A template whose output is not the concatenation of per-message pieces for a plain user / assistant /
user conversation is refused (the caller falls back to a built-in template and says so). A system message
that the template folds into the first user turn (Gemma's) is written as a turn of its own, as the
built-in `gemma` template does. A system turn the template writes when the conversation has none (Qwen2.5's
"You are Qwen, created by Alibaba Cloud. ...", SmolLM2's "You are a helpful AI assistant named SmolLM ...")
is the template's `default_system`: written before the messages of a conversation that does not open with
a system message, exactly as the model was trained, and replaced by the conversation's own system prompt
when it has one (the template itself does that). Like the preamble it is the template's text: in the context
window, not in usage. The stop sequences are the assistant turn's closing marker and EOS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference_service.prompt import PromptTemplate, Role, Turn

log = logging.getLogger(__name__)

_SENTINEL = "\ue000chatmesh\ue000"
"""Stands in for a message's text in the probes (private-use characters no template produces)."""


_BOS = "\ue000bos\ue000"
"""Stands in for the BOS token in the probes, so that only the BOS the template writes is left out."""


class ChatTemplateError(ValueError):
    """The GGUF's chat template cannot be used; the message says why."""


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def template_from_jinja(source: str, bos_token: str, eos_token: str, name: str = "gguf") -> PromptTemplate:
    """The `PromptTemplate` that renders conversations as the Jinja chat template `source` does.

    `bos_token` is left out of the formats (the tokenizer adds BOS itself). A system turn the template
    writes when a conversation has none (Qwen2.5's and SmolLM2's default system prompts) becomes the
    template's `default_system`. Raises `ChatTemplateError` when the template fails to render or cannot
    be split into per-message pieces."""
    render = _renderer(source, bos_token, eos_token)
    asked = render([_user("Q")])
    answered = render([_user("Q"), _assistant(_SENTINEL)])
    cue = render([_user("Q")], cue=True)
    if not answered.startswith(asked) or not cue.startswith(asked):
        raise ChatTemplateError("the chat template does not render message by message")
    assistant_turn = answered[len(asked) :]
    # A user turn as the template writes it after the first exchange, free of whatever it writes only at
    # the start of a conversation.
    followed = render([_user("Q"), _assistant("A")])
    later = render([_user("Q"), _assistant("A"), _user(_SENTINEL)])
    first = render([_user(_SENTINEL)])
    if not later.startswith(followed):
        raise ChatTemplateError("the chat template does not render message by message")
    user_turn = later[len(followed) :]
    if _SENTINEL not in user_turn or _SENTINEL not in assistant_turn or not first.endswith(user_turn):
        raise ChatTemplateError("the chat template does not render message by message")
    if user_turn.count(_SENTINEL) != 1 or assistant_turn.count(_SENTINEL) != 1:
        # A message's text is tokenized as plain text between the markup: it must have one place.
        raise ChatTemplateError("the chat template writes a message's text more than once")
    # What a conversation without a system message starts with: the template's default system turn.
    default_system = first[: -len(user_turn)]
    user_format = _escape(user_turn).replace(_escape(_SENTINEL), "{content}")
    assistant_format = _escape(assistant_turn).replace(_escape(_SENTINEL), "{content}")
    own_system = _system_format(render, user_format)
    if default_system and own_system is None:
        raise ChatTemplateError(
            "the chat template adds a default system prompt but folds a given one into the first turn"
        )
    # Whether the template strips each message's surrounding whitespace (Gemma's does: `| trim`).
    padded = render([_user("Q"), _assistant("A"), _user(f" \n{_SENTINEL}\n ")])
    trim_content = padded == later
    closing = assistant_turn.split(_SENTINEL, 1)[1].strip()
    stop = tuple(dict.fromkeys(marker for marker in (closing, eos_token) if marker))
    template = PromptTemplate(
        name=name,
        system=own_system or user_format,
        user=user_format,
        assistant=assistant_format,
        generation_cue=cue[len(asked) :],
        stop=stop,
        trim_content=trim_content,
        default_system=default_system,
    )
    # The check that matters: whole conversations come out as the template itself renders them, with and
    # (when the template writes a system turn of its own) without the default system prompt.
    conversation = [_user("What is 2 plus 2?"), _assistant("4"), _user("And 3 plus 3?\n")]
    conversations = [conversation]
    if own_system is not None:
        conversations.append([{"role": "system", "content": "Be brief."}, *conversation])
    for messages in conversations:
        turns = [Turn(Role(m["role"]), m["content"]) for m in messages]
        if template.render(turns) != render(messages, cue=True):
            raise ChatTemplateError("the chat template's output is not the sum of its messages")
    return template


def _renderer(source: str, bos_token: str, eos_token: str) -> Callable[..., str]:
    """`render(messages, cue=False)`: the Jinja template `source` compiled in the sandbox and applied to
    `messages` (with the generation cue when `cue`), without the leading BOS the template writes.

    Only a `bos_token` the template writes is dropped, not text that merely looks like it: SmolLM2's BOS
    is `<|im_start|>`, which its template's first turn begins with as markup."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> Any:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        compiled = environment.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not parse: {exc}") from exc

    def render(messages: list[dict[str, str]], cue: bool = False) -> str:
        try:
            text = compiled.render(
                messages=messages, add_generation_prompt=cue, bos_token=_BOS, eos_token=eos_token
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template fails on a plain conversation: {exc}") from exc
        return text.removeprefix(_BOS).replace(_BOS, bos_token)

    return render


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _system_format(render: Any, user_format: str) -> str | None:
    """The system message's own format, when the template writes it as a piece before the first user
    turn; None when it folds it into that turn (the caller then writes it as a user turn)."""
    with_system = render([{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "Q"}])
    user_part = user_format.format(content="Q")
    if not with_system.endswith(user_part):
        return None
    piece = with_system[: -len(user_part)]
    if piece.count(_SENTINEL) != 1:
        return None
    return _escape(piece).replace(_escape(_SENTINEL), "{content}")


def gguf_chat_template(path: Path) -> tuple[str, str, str] | None:
    """(`tokenizer.chat_template`, BOS text, EOS text) of the GGUF at `path`, or None if it has no
    template. Blocking (reads the vocabulary): call it from a worker thread in async code."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        metadata = vocab.metadata
        source = metadata.get("tokenizer.chat_template")
        if not source:
            return None

        def token_text(key: str) -> str:
            token = metadata.get(key)
            return vocab.detokenize([int(token)], special=True).decode(errors="replace") if token else ""

        return source, token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id")
    finally:
        # Freed now, not whenever the garbage collector finds the instance: that happened under load
        # and held the event loop for tens of milliseconds (a 262k-token vocabulary).
        vocab.close()


def resolve_template(choice: str, fallback: PromptTemplate, gguf: Path | None) -> PromptTemplate:
    """The template `choice` names, or for "auto" the GGUF's own chat template when it carries a usable
    one, else `fallback` (the transcript with its preamble). Blocking: see `gguf_chat_template`."""
    if choice != "auto" or gguf is None or gguf.suffix != ".gguf":
        return fallback
    found = gguf_chat_template(gguf)
    if found is None:
        log.info(
            "the model carries no chat template: prompting with the transcript", extra={"gguf": str(gguf)}
        )
        return fallback
    source, bos, eos = found
    try:
        template = template_from_jinja(source, bos, eos, name="gguf")
    except ChatTemplateError as exc:
        log.warning(
            "the model's chat template cannot be used (%s): prompting with the transcript; set"
            " CHATMESH_INFERENCE_PROMPT_TEMPLATE to gemma or chatml if the model is one of those",
            exc,
            extra={"gguf": str(gguf)},
        )
        return fallback
    log.info(
        "prompting with the model's own chat template", extra={"gguf": str(gguf), "stop": list(template.stop)}
    )
    return template
