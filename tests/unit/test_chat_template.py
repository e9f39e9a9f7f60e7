"""A GGUF's own Jinja chat template turned into the service's per-message prompt template."""

from __future__ import annotations

import pytest

from inference_service.chat_template import ChatTemplateError, template_from_jinja
from inference_service.prompt import TEMPLATES, Role, Turn

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
# Gemma's instruction-tuned template (as in its GGUFs): the system message folded into the first user turn.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content']"
    " + '\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set"
    " loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] =="
    " 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate"
    " user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role"
    " = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' +"
    " (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor"
    " %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
# Gemma 3's template as its instruction-tuned GGUFs carry it: whitespace control, and content that may be
# a string or a list of parts.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
TURNS = [
    Turn(Role.SYSTEM, "Be brief."),
    Turn(Role.USER, "What is the capital of France?"),
    Turn(Role.ASSISTANT, "Paris."),
    Turn(Role.USER, "And of {Italy}?"),
]


def test_chatml_comes_out_as_the_built_in_chatml() -> None:
    derived = template_from_jinja(CHATML, bos_token="", eos_token="<|endoftext|>")
    assert derived.render(TURNS) == TEMPLATES["chatml"].render(TURNS)
    assert derived.stop == ("<|im_end|>", "<|endoftext|>")


def test_gemma_writes_the_system_message_as_a_turn_of_its_own_and_stops_at_end_of_turn() -> None:
    derived = template_from_jinja(GEMMA, bos_token="<bos>", eos_token="<eos>")
    assert derived.render(TURNS[1:]) == TEMPLATES["gemma"].render(TURNS[1:])
    assert derived.render(TURNS).startswith("<start_of_turn>user\nBe brief.<end_of_turn>\n")
    assert not derived.render(TURNS).startswith("<bos>"), "the tokenizer adds BOS itself"
    assert derived.stop == ("<end_of_turn>", "<eos>")
    assert derived.generation_cue == "<start_of_turn>model\n"


def test_gemma_3s_own_template_with_content_parts_gives_the_built_in_gemma() -> None:
    derived = template_from_jinja(GEMMA3, bos_token="<bos>", eos_token="<eos>")
    assert derived.render(TURNS[1:]) == TEMPLATES["gemma"].render(TURNS[1:])
    assert derived.stop == ("<end_of_turn>", "<eos>")


@pytest.mark.parametrize(("source", "trims"), [(CHATML, False), (GEMMA, True), (GEMMA3, True)])
def test_whitespace_around_a_message_is_kept_or_trimmed_as_the_template_does(
    source: str, trims: bool
) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    derived = template_from_jinja(source, bos_token="<bos>", eos_token="<eos>")
    turns = [Turn(Role.USER, "  Hi there \n"), Turn(Role.ASSISTANT, "\nHello. "), Turn(Role.USER, " Bye")]
    messages = [{"role": turn.role.value, "content": turn.content} for turn in turns]
    expected = (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(source)
        .render(messages=messages, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")
        .removeprefix("<bos>")
    )
    assert derived.trim_content is trims
    assert derived.render(turns) == expected


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("{% for m in messages %}{{ m['content'] ", "does not parse"),
        ("{{ raise_exception('no') }}", "fails on a plain conversation"),
        # Depends on the whole conversation at once: not the sum of its messages.
        (
            "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "message by message",
        ),
        # Jinja's sandbox: no way to Python's internals from a model file.
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ],
)
def test_templates_that_cannot_be_used_are_refused_with_the_reason(source: str, problem: str) -> None:
    with pytest.raises(ChatTemplateError, match=problem):
        template_from_jinja(source, bos_token="", eos_token="")


def test_auto_reads_the_model_file_and_keeps_the_transcript_for_a_model_without_a_template() -> None:
    from inference_service.chat_template import gguf_chat_template, resolve_template
    from inference_service.model_files import bundled_gguf_path

    fallback = TEMPLATES["transcript"]
    bundled = bundled_gguf_path()
    assert gguf_chat_template(bundled) is None, "the bundled base model carries no chat template"
    assert resolve_template("auto", fallback, bundled) is fallback
    assert resolve_template("chatml", fallback, bundled) is fallback  # an explicit choice is not looked up


# Templates that write a system turn of their own when the conversation has none: Qwen2.5's and SmolLM2's,
# read from the catalog's files (pulled by `python -m chatmesh models pull NAME`).
QWEN_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)
SMOLLM_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def catalog_template(name: str) -> tuple[str, str, str]:
    """(template, BOS, EOS) of the catalog model `name`'s pulled file."""
    from chatmesh.models.catalog import CATALOG
    from chatmesh.models.store import ModelStore
    from inference_service.chat_template import gguf_chat_template

    path = ModelStore().path(CATALOG[name])
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `python -m chatmesh models pull {name}`")
    found = gguf_chat_template(path)
    assert found is not None, f"{name}'s file carries a chat template"
    return found


def jinja_render(source: str, turns: list[Turn], bos: str, eos: str) -> str:
    """What the template itself writes for `turns`, with the generation cue, without a leading BOS."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": turn.role.value, "content": turn.content} for turn in turns]
    # Qwen's and SmolLM2's templates never write bos_token (SmolLM2's BOS, <|im_start|>, is markup there).
    return (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(source)
        .render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    )


@pytest.mark.parametrize(
    ("name", "default_system"),
    [("qwen2.5-coder-0.5b-instruct", QWEN_DEFAULT_SYSTEM), ("smollm2-135m-instruct", SMOLLM_DEFAULT_SYSTEM)],
)
def test_a_default_system_prompt_is_written_only_when_the_chat_has_none(
    name: str, default_system: str
) -> None:
    source, bos, eos = catalog_template(name)
    derived = template_from_jinja(source, bos_token=bos, eos_token=eos)

    assert derived.default_system == default_system
    # Otherwise ChatML, as the template writes it, with its end-of-turn marker as the stop.
    chatml = TEMPLATES["chatml"]
    assert (derived.system, derived.user, derived.assistant) == (chatml.system, chatml.user, chatml.assistant)
    assert derived.generation_cue == chatml.generation_cue
    assert derived.stop == ("<|im_end|>",)
    # Without a system message: the template's default one first, as the model was trained.
    history = TURNS[1:]
    assert derived.render(history) == jinja_render(source, history, bos, eos)
    assert derived.render(history).startswith(default_system)
    # With one: the chat's own system prompt replaces it.
    assert derived.render(TURNS) == jinja_render(source, TURNS, bos, eos)
    assert default_system not in derived.render(TURNS)
    assert derived.render(TURNS).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    # A system message further on is a turn like any other, after the default one (as the template has it).
    later_system = [*TURNS[1:3], Turn(Role.SYSTEM, "Now answer in French."), TURNS[3]]
    assert derived.render(later_system) == jinja_render(source, later_system, bos, eos)
    assert derived.render(later_system).startswith(default_system)


def test_a_template_that_adds_a_default_system_prompt_but_folds_a_given_one_is_refused() -> None:
    # A given system prompt goes into the first user turn, a missing one becomes a turn of its own: no
    # per-message rendering serves both.
    source = (
        "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{{ '<|sys|>Be helpful.<|end|>' }}"
        "{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}{{ '<|' + m['role'] + '|>' + (prefix if loop.first else '')"
        " + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="default system prompt"):
        template_from_jinja(source, bos_token="", eos_token="<|end|>")


def test_the_default_system_prompt_is_counted_as_the_templates_tokens_not_the_callers() -> None:
    from chatmesh.models.catalog import QWEN_CODER_05B
    from chatmesh.models.store import ModelStore
    from inference_service.backends.tokenizers import LlamaTokenizer, tokenize_prompt

    source, bos, eos = catalog_template(QWEN_CODER_05B.name)
    template = template_from_jinja(source, bos_token=bos, eos_token=eos)
    vocab = LlamaTokenizer.vocab_only(ModelStore().path(QWEN_CODER_05B))
    default_system = len(vocab.encode(QWEN_DEFAULT_SYSTEM, special=True))

    without = tokenize_prompt(template, TURNS[1:], vocab)
    own = tokenize_prompt(template, TURNS, vocab)

    # Exactly what the template renders, tokenized whole.
    for prompt, turns in ((without, TURNS[1:]), (own, TURNS)):
        rendered = jinja_render(source, turns, bos, eos)
        assert list(prompt.token_ids) == [*vocab.prefix, *vocab.encode(rendered, special=True)]
    # Left out of usage like the preamble; in the template's tokens, not a message's (CountTokens' pieces).
    assert (without.preamble_tokens, own.preamble_tokens) == (default_system, 0)
    assert list(without.message_tokens) == list(own.message_tokens)[1:]
    assert without.template_tokens == own.template_tokens + default_system
