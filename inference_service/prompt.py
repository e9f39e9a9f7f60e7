"""Turning an OpenAI-style message list into the prompt text a completion model continues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a conversation."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """How each role is written into the prompt, and what the model writes to end its turn.

    `generation_cue` is appended after the last message so the model answers as the assistant;
    `stop` sequences mark the model starting the next user turn. `preamble` comes before the messages:
    text that shows a base model what kind of answers to give (see `FEW_SHOT_PREAMBLE`). `default_system`
    follows it unless the conversation opens with a system message: the system turn a chat template
    writes by default (Qwen2.5's "You are Qwen, ..."); a conversation's own system prompt replaces it.
    Both are the template's text, not the caller's: counted in the context window, never in usage.
    `trim_content`: each message's text loses its surrounding whitespace, as Gemma's own template writes
    it.
    """

    name: str
    system: str
    user: str
    assistant: str
    generation_cue: str
    stop: tuple[str, ...]
    preamble: str = ""
    trim_content: bool = False
    default_system: str = ""

    def render(self, turns: Sequence[Turn]) -> str:
        """The whole prompt text: the fixed start (`start_of`), every message with its role markup, then
        the cue."""
        return self.start_of(turns) + "".join(self.render_messages(turns)) + self.generation_cue

    def start_of(self, turns: Sequence[Turn]) -> str:
        """What comes before the messages of `turns`: the preamble, then the default system turn unless
        the conversation opens with a system message of its own."""
        return self.preamble + self.default_system_of(turns)

    def default_system_of(self, turns: Sequence[Turn]) -> str:
        """`default_system` unless `turns` opens with a system message (then ""), as the chat templates
        that have one decide it (Qwen2.5's, SmolLM2's: a system message further on is a turn like any)."""
        return "" if turns and turns[0].role is Role.SYSTEM else self.default_system

    def render_messages(self, turns: Sequence[Turn]) -> list[str]:
        """Each message with its role markup, in order; the prompt is these joined plus the cue.

        Backends tokenize these pieces one by one, the markup apart from the message's own text (see
        `backends.tokenizers.tokenize_prompt`).
        """
        return [self.format_of(turn.role).format(content=self.content_of(turn)) for turn in turns]

    def format_of(self, role: Role) -> str:
        """The role's format: its markup around one `{content}` field."""
        return {Role.SYSTEM: self.system, Role.USER: self.user, Role.ASSISTANT: self.assistant}[role]

    def content_of(self, turn: Turn) -> str:
        """The message's text as the format takes it (trimmed if the template trims)."""
        return turn.content.strip() if self.trim_content else turn.content


TEMPLATES: dict[str, PromptTemplate] = {
    # Plain transcript: works on base models with no chat tuning (e.g. Gemma 3 270M base).
    "transcript": PromptTemplate(
        name="transcript",
        system="{content}\n\n",
        user="User: {content}\n",
        assistant="Assistant: {content}\n",
        generation_cue="Assistant:",
        stop=("\nUser:", "\nAssistant:"),
    ),
    # Gemma instruction-tuned turn markers (system text goes into the first user turn there; a
    # separate block keeps this template simple and still works in practice).
    "gemma": PromptTemplate(
        name="gemma",
        system="<start_of_turn>user\n{content}<end_of_turn>\n",
        user="<start_of_turn>user\n{content}<end_of_turn>\n",
        assistant="<start_of_turn>model\n{content}<end_of_turn>\n",
        generation_cue="<start_of_turn>model\n",
        stop=("<end_of_turn>",),
        trim_content=True,
    ),
    "chatml": PromptTemplate(
        name="chatml",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
        generation_cue="<|im_start|>assistant\n",
        stop=("<|im_end|>",),
    ),
}


FEW_SHOT_PREAMBLE = (
    "The following is a conversation with a helpful assistant. The assistant answers each question"
    " correctly, in one short sentence.\n\n"
    "User: What is the capital of Italy?\n"
    "Assistant: The capital of Italy is Rome.\n"
    "User: What is 3 plus 4?\n"
    "Assistant: 3 plus 4 is 7.\n\n"
)
"""An instruction and two worked examples in the transcript's own format: a base model with no chat
tuning (the bundled Gemma 3 270M) then answers the question instead of continuing it with another."""

PREAMBLES = {"none": "", "few-shot": FEW_SHOT_PREAMBLE}
