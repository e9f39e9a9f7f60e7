"""Every catalog model through the real engine (llama-server) with its real file: the template and stop
tokens the catalog names are the file's, the prompt the engine gets is the template's rendering of a
history of several turns with a system prompt (Qwen's default system prompt when the chat has none), and
the reply ends at the end-of-turn marker, which never shows in the text. Then one service serving two
models, each request on its own engine, and a damaged model file refused at start-up."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chatmesh.inference.v1 import inference_pb2 as pb
from chatmesh.inference.v1 import inference_pb2_grpc
from chatmesh.models.catalog import CATALOG, GEMMA3_270M, SMOLLM2_135M
from chatmesh.models.store import CACHE_DIR_VARIABLE, ModelStore
from inference_service.backends.tokenizers import LlamaTokenizer, tokenize_prompt
from inference_service.chat_template import gguf_chat_template, template_from_jinja
from inference_service.model_files import catalog_model_file
from inference_service.prompt import FEW_SHOT_PREAMBLE, TEMPLATES, Role, Turn
from tests.support.metrics import Samples, scrape, value
from tests.support.processes import command_line, find_processes, start_process, stop_process
from tests.support.stack import Service, free_address, inference_env, inference_service

pytestmark = pytest.mark.integration

SYSTEM = pb.Message(role=pb.ROLE_SYSTEM, content="Answer in one short sentence.")
HISTORY = [
    pb.Message(role=pb.ROLE_USER, content="What is the capital of France?"),
    pb.Message(role=pb.ROLE_ASSISTANT, content="The capital of France is Paris."),
    pb.Message(role=pb.ROLE_USER, content="What is the capital of Italy?"),
]
ROLES = {pb.ROLE_SYSTEM: Role.SYSTEM, pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT}
MAX_TOKENS = 40
QWEN_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)
SMOLLM_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
DEFAULT_SYSTEM = {
    "qwen2.5-coder-0.5b-instruct": QWEN_DEFAULT_SYSTEM,
    "smollm2-135m-instruct": SMOLLM_DEFAULT_SYSTEM,
    "gemma-3-270m": "",
}
"""The system turn each file's template writes for a conversation without one."""


def served_default_system(name: str) -> str:
    """The default system turn the service sends: the template's, unless the catalog turns it off."""
    return DEFAULT_SYSTEM[name] if CATALOG[name].default_system_prompt else ""


class Models:
    """The catalog models' verified files (pulled by `python -m chatmesh models pull NAME`) and their
    vocabularies, each loaded once."""

    def __init__(self) -> None:
        self._files: dict[str, Path] = {}
        self._vocabs: dict[str, Any] = {}

    def file(self, name: str) -> Path:
        if name not in self._files:
            self._files[name] = catalog_model_file(CATALOG[name], ModelStore())
        return self._files[name]

    def tokenizer(self, name: str) -> LlamaTokenizer:
        from llama_cpp import Llama

        if name not in self._vocabs:
            self._vocabs[name] = Llama(model_path=str(self.file(name)), vocab_only=True, verbose=False)
        return LlamaTokenizer(self._vocabs[name])

    def tokens(self, name: str, text: str) -> int:
        """How many tokens `text` (template markup) is in `name`'s vocabulary."""
        return len(self.tokenizer(name).encode(text, special=True)) if text else 0

    def close(self) -> None:
        for vocab in self._vocabs.values():
            vocab.close()


@pytest.fixture(scope="module")
def models() -> Iterator[Models]:
    found = Models()
    yield found
    found.close()


def turns(messages: list[pb.Message]) -> list[Turn]:
    return [Turn(ROLES[m.role], m.content) for m in messages]


def expected_prompt_tokens(models: Models, name: str, messages: list[pb.Message]) -> int:
    """How many tokens the engine should be sent for `messages`: the file's own chat template rendered
    by Jinja and tokenized whole (template models; without the default system turn where the catalog turns
    it off), or the transcript after the few-shot preamble."""
    vocab = models.tokenizer(name)
    found = gguf_chat_template(models.file(name))
    if found is None:
        template = dataclasses.replace(TEMPLATES["transcript"], preamble=FEW_SHOT_PREAMBLE)
        return tokenize_prompt(template, turns(messages), vocab).token_count
    source, _, eos = found
    rendered = (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(source)
        .render(
            messages=[{"role": turn.role.value, "content": turn.content} for turn in turns(messages)],
            add_generation_prompt=True,
            eos_token=eos,
        )
    )
    if not served_default_system(name):
        rendered = rendered.removeprefix(DEFAULT_SYSTEM[name])
    return len(vocab.prefix) + len(vocab.encode(rendered, special=True))


@pytest.mark.parametrize("name", list(CATALOG))
def test_the_catalog_names_the_template_and_stops_the_file_carries(models: Models, name: str) -> None:
    model = CATALOG[name]
    found = gguf_chat_template(models.file(name))
    if model.chat_template == "none":
        assert found is None, f"{name}'s file carries a chat template; the catalog says none"
        assert model.prompt_format == "transcript"
        assert model.stop == TEMPLATES["transcript"].stop
        return
    assert found is not None, (
        f"{name}'s file carries no chat template; the catalog says {model.chat_template}"
    )
    derived = template_from_jinja(*found)
    family = TEMPLATES[model.chat_template]
    assert (derived.system, derived.user, derived.assistant, derived.generation_cue) == (
        family.system,
        family.user,
        family.assistant,
        family.generation_cue,
    ), f"{name}'s template is not {model.chat_template}"
    assert model.stop == derived.stop, "the catalog's stops are the template's end-of-turn marker and EOS"
    assert derived.default_system == DEFAULT_SYSTEM[name]


@pytest.fixture(scope="module", params=list(CATALOG))
def catalog_engine(request: pytest.FixtureRequest) -> Iterator[tuple[str, Service]]:
    name: str = request.param
    # The catalog's own prompting (few-shot preamble for the transcript model: the suite pins none).
    with inference_service(
        standard=False,
        models=name,
        prompt_preamble="few-shot",
        context_length=512,
        max_concurrent=1,
        default_max_tokens=MAX_TOKENS,
    ) as service:
        yield name, service


@pytest.fixture
async def stub(
    catalog_engine: tuple[str, Service],
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(catalog_engine[1].address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]


async def generate(
    stub: inference_pb2_grpc.InferenceServiceStub, messages: list[pb.Message], model: str = ""
) -> tuple[str, pb.Finished]:
    request = pb.GenerateRequest(
        messages=messages, model=model, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    )
    text, finished = "", None
    async for event in stub.Generate(request):
        if event.HasField("delta"):
            text += event.delta.text
        else:
            finished = event.finished
    assert finished is not None
    return text, finished


@pytest.mark.parametrize("system", [True, False], ids=["system-prompt", "no-system-prompt"])
async def test_the_engine_gets_the_templates_rendering_of_the_whole_history(
    stub: inference_pb2_grpc.InferenceServiceStub,
    catalog_engine: tuple[str, Service],
    models: Models,
    system: bool,
) -> None:
    name = catalog_engine[0]
    messages = [SYSTEM, *HISTORY] if system else HISTORY
    counted = await stub.CountTokens(pb.CountTokensRequest(messages=messages, model=name))

    assert counted.prompt_tokens == expected_prompt_tokens(models, name, messages)
    assert counted.prompt_tokens == counted.template_tokens + sum(counted.message_tokens)
    # The default system prompt (Qwen's, SmolLM2's) is the template's, only without the chat's own.
    default_system = 0 if system else models.tokens(name, served_default_system(name))
    preamble = models.tokens(name, FEW_SHOT_PREAMBLE) if name == GEMMA3_270M.name else 0
    text, finished = await generate(stub, messages)
    # Usage is what the engine read, less what the template added that the caller never wrote.
    assert finished.usage.prompt_tokens == counted.prompt_tokens - default_system - preamble
    assert finished.finish_reason == pb.FINISH_REASON_STOP, f"{name} ran on to max_tokens: {text!r}"
    assert finished.usage.completion_tokens < MAX_TOKENS
    assert "Rome" in text, f"{name} answered {text!r}"
    for marker in ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "\nUser:", "\nAssistant:"):
        assert marker not in text, f"the end-of-turn marker {marker!r} is the engine's, not the reply's"


async def test_the_chats_own_system_prompt_replaces_the_default_one(
    stub: inference_pb2_grpc.InferenceServiceStub, catalog_engine: tuple[str, Service], models: Models
) -> None:
    name = catalog_engine[0]
    with_system = await stub.CountTokens(pb.CountTokensRequest(messages=[SYSTEM, *HISTORY], model=name))
    without = await stub.CountTokens(pb.CountTokensRequest(messages=HISTORY, model=name))

    default_system = models.tokens(name, served_default_system(name))
    # Its own system message is a message like any other; the default one is in the template's tokens.
    assert list(with_system.message_tokens)[1:] == list(without.message_tokens)
    assert without.template_tokens == with_system.template_tokens + default_system


def engine_files(service_pid: int) -> list[str]:
    """The model file of each llama-server that is a child of `service_pid`, sorted."""

    def parent(pid: int) -> int:
        # /proc/<pid>/stat: after the parenthesised command name, the state then the parent's pid.
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])

    children = [pid for pid in find_processes("llama-server") if parent(pid) == service_pid]
    return sorted(command_line(pid).split(" --model ")[1].split(" ")[0] for pid in children)


@pytest.fixture(scope="module")
def two_models() -> Iterator[tuple[Service, str]]:
    metrics = free_address()
    with inference_service(
        models=f"{GEMMA3_270M.name},{SMOLLM2_135M.name}",
        context_length=512,
        max_concurrent=2,
        metrics_address=metrics,
    ) as service:
        yield service, metrics


@pytest.fixture
async def two_stub(
    two_models: tuple[Service, str],
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(two_models[0].address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]


async def test_one_service_serves_two_models_each_on_its_own_engine(
    two_stub: inference_pb2_grpc.InferenceServiceStub, two_models: tuple[Service, str], models: Models
) -> None:
    service, metrics_address = two_models
    listed = await two_stub.ListModels(pb.ListModelsRequest())
    assert [m.model for m in listed.models] == [GEMMA3_270M.name, SMOLLM2_135M.name], "the default first"
    assert (await two_stub.GetModelInfo(pb.GetModelInfoRequest())).model == GEMMA3_270M.name
    assert engine_files(service.process.pid) == sorted(
        str(models.file(name)) for name in (GEMMA3_270M.name, SMOLLM2_135M.name)
    ), "one llama-server per model, each on its own file"

    question = HISTORY[:1]
    counts = {
        name: (await two_stub.CountTokens(pb.CountTokensRequest(messages=question, model=name))).prompt_tokens
        for name in (GEMMA3_270M.name, SMOLLM2_135M.name)
    }
    # Each model's own tokenizer and template (the suite's bare transcript for Gemma; ChatML for SmolLM2).
    gemma_vocab = models.tokenizer(GEMMA3_270M.name)
    assert (
        counts[GEMMA3_270M.name]
        == tokenize_prompt(TEMPLATES["transcript"], turns(question), gemma_vocab).token_count
    )
    assert counts[SMOLLM2_135M.name] == expected_prompt_tokens(models, SMOLLM2_135M.name, question)
    assert counts[GEMMA3_270M.name] != counts[SMOLLM2_135M.name]

    before = scrape(metrics_address)
    _, smollm = await generate(two_stub, question, model=SMOLLM2_135M.name)
    after_smollm = scrape(metrics_address)
    _, gemma = await generate(two_stub, question)  # no model: the default
    after_gemma = scrape(metrics_address)

    smollm_default_system = models.tokens(SMOLLM2_135M.name, SMOLLM_DEFAULT_SYSTEM)
    assert smollm.usage.prompt_tokens == counts[SMOLLM2_135M.name] - smollm_default_system
    assert gemma.usage.prompt_tokens == counts[GEMMA3_270M.name]

    def input_tokens(samples: Samples, model: str) -> float:
        return value(
            samples, "gen_ai_server_tokens_total", gen_ai_request_model=model, gen_ai_token_type="input"
        )

    # Each generation is recorded under the model that served it, and only there.
    assert input_tokens(after_smollm, SMOLLM2_135M.name) - input_tokens(before, SMOLLM2_135M.name) == (
        smollm.usage.prompt_tokens + smollm_default_system
    )
    assert input_tokens(after_smollm, GEMMA3_270M.name) == input_tokens(before, GEMMA3_270M.name)
    assert input_tokens(after_gemma, GEMMA3_270M.name) - input_tokens(after_smollm, GEMMA3_270M.name) == (
        gemma.usage.prompt_tokens
    )


async def test_a_model_not_served_is_not_found_naming_the_served_ones(
    two_stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    served = f"served: {GEMMA3_270M.name}, {SMOLLM2_135M.name}"
    calls = [
        two_stub.Generate(pb.GenerateRequest(messages=HISTORY, model="llama-9000")).read(),
        two_stub.CountTokens(pb.CountTokensRequest(messages=HISTORY, model="llama-9000")),
        two_stub.GetModelInfo(pb.GetModelInfoRequest(model="llama-9000")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert raised.value.details() == f"model 'llama-9000' is not served here; {served}"


async def test_a_partial_model_file_is_refused_at_start_with_the_fix(tmp_path: Path, models: Models) -> None:
    store = ModelStore(tmp_path)
    partial = store.path(SMOLLM2_135M)
    partial.parent.mkdir(parents=True)
    with models.file(SMOLLM2_135M.name).open("rb") as whole, partial.open("wb") as copy:
        copy.write(whole.read(1 << 20))  # an interrupted download
    env = {
        **inference_env(free_address(), models=SMOLLM2_135M.name, metrics_address=free_address()),
        CACHE_DIR_VARIABLE: str(tmp_path),
    }
    process = start_process([sys.executable, "-m", "inference_service"], env)
    try:
        returncode = await asyncio.to_thread(process.wait, 60)
        output = process.output()
    finally:
        stop_process(process)
        process.remove_log()

    assert returncode != 0
    assert (
        f"model '{SMOLLM2_135M.name}': {partial} is 1,048,576 bytes, the catalog says"
        f" {SMOLLM2_135M.size:,} (a partial or damaged file); run `chatmesh models pull {SMOLLM2_135M.name}`"
    ) in output
    assert "starting llama-server" not in output, "no engine is started on a damaged file"
    assert "Traceback" not in output, "a clear error, not a crash"
