"""A real Triton Inference Server on the CPU, serving a TensorRT-LLM-shaped model that runs llama.cpp.

Test support: stands in for a GPU Triton + TensorRT-LLM deployment. The model is decoupled and speaks the
tensor names of deploy/triton's `ensemble` (TensorRT-LLM's, the prompt as token ids):

    inputs   input_ids INT32 [1,N]   input_lengths INT32 [1,1]   max_tokens INT32 [1,1]
             end_id INT32 [1,1]   pad_id INT32 [1,1]   stop_words_list INT32 [1,2,M]   stream BOOL [1,1]
             temperature FP32 [1,1]   top_p FP32 [1,1]   top_k INT32 [1,1]   random_seed UINT64 [1,1]
                                                                         (all but input_ids optional)
    output   text_output BYTES [1,1]  one response per generated token when streaming

Like TensorRT-LLM, the token that completes a stop word is still sent (so clients must cut it off), and
the stream ends right after; the end_id token ends a generation and is not sent. The stop words (token
ids in TensorRT-LLM's word-list format) are turned back into text with the model's vocabulary and matched
in the generated text. `--record-inputs FILE` appends each request's token-id inputs to FILE as a JSON
line, so that tests can check what the model was sent. Generation uses the bundled Gemma 3 270M GGUF with
llama-cpp-python, from the token ids as sent (never detokenized and tokenized again, which would parse
special tokens in the text), or with `--engine fixed` a fixed token source: the words of a fixed text,
one per response, as fast as Triton takes them or at `--tokens-per-s` per stream, so that the relay
around a GPU-speed engine can be measured on a CPU (`benchmarks/triton_relay.py`); or with `--engine
decoder` a tiny random-weight torch decoder over a vocabulary of words, on the GPU when CUDA is present
(else the CPU): real autoregressive compute per token, greedy or sampled, as fast as the device runs it.

    python tests/support/triton_llama_model.py --grpc-port P --http-port H --metrics-port M [--engine fixed]

prints `READY` on stdout once the model is being served, and shuts Triton down cleanly on SIGTERM/SIGINT.
pytriton relays Triton's own log to stdout in unbuffered chunks that can split lines (READY may land in
the middle of one), so pass `--log-file` when a program reads stdout.

pytriton (0.7.0, Triton 2.51) quirks handled here:
- its python-backend stub links the system libpython, so the interpreter's LIBDIR must be on
  LD_LIBRARY_PATH before Triton starts (pytriton copies os.environ when it spawns tritonserver);
- cancelled Triton requests are not reported to the Python side, so a generation whose client went away
  runs to its end (several llama.cpp instances keep that from blocking the next request);
- Triton 2.51 crashes (SIGSEGV) when a client cancels a stream just as its request sends the final flag
  (fixed upstream in 2.54): clients of this server must not cancel a stream that is ending anyway, see
  docs/triton-crash.md;
- after a client cancelled a stream, unloading the model at shutdown often hangs until Triton's exit
  timeout (5 s here) and Triton then leaves its model copy in /tmp, which this script removes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import sys
import sysconfig
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("triton_llama_model")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """The inputs of one Triton request, decoded from their tensors."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    end_id: int | None
    pad_id: int | None
    stream: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_word_ids: tuple[tuple[int, ...], ...]

    @classmethod
    def from_tensors(cls, inputs: Any) -> GenerationRequest:
        """Decode a pytriton request (a mapping of input name to numpy array, batch dimension first)."""

        def scalar(name: str, default: Any) -> Any:
            return inputs[name].flatten()[0].item() if name in inputs else default

        ids = [int(token) for token in inputs["input_ids"].flatten()]
        seed = scalar("random_seed", None)
        end_id, pad_id = scalar("end_id", None), scalar("pad_id", None)
        return cls(
            prompt_ids=tuple(ids[: int(scalar("input_lengths", len(ids)))]),
            max_tokens=int(scalar("max_tokens", 16)),
            end_id=None if end_id is None else int(end_id),
            pad_id=None if pad_id is None else int(pad_id),
            stream=bool(scalar("stream", False)),
            temperature=float(scalar("temperature", 1.0)),
            top_p=float(scalar("top_p", 1.0)),
            # TensorRT-LLM's top_k=0 means "no top-k"; llama.cpp reads k <= 0 the same way.
            top_k=int(scalar("top_k", 0)),
            # llama.cpp seeds are 32-bit.
            seed=None if seed is None else int(seed) & 0xFFFFFFFF,
            stop_word_ids=_word_list(inputs["stop_words_list"]) if "stop_words_list" in inputs else (),
        )

    def record(self) -> dict[str, Any]:
        """The token-id inputs, as `--record-inputs` writes them."""
        return {
            "input_ids": list(self.prompt_ids),
            "end_id": self.end_id,
            "pad_id": self.pad_id,
            "stop_words": [list(word) for word in self.stop_word_ids],
        }


def _word_list(tensor: npt.NDArray[Any]) -> tuple[tuple[int, ...], ...]:
    """The words of a TensorRT-LLM word list [1, 2, M]: row 0 their ids one after another, row 1 where
    each ends, padded with -1."""
    ids, ends = (row.tolist() for row in tensor.reshape(2, -1))
    words = []
    start = 0
    for end in ends:
        if end < 0:
            break
        words.append(tuple(int(token) for token in ids[start:end]))
        start = end
    return tuple(words)


class StopWords:
    """Turns a request's stop words (token ids) back into text with the model's vocabulary (special tokens
    shown as their markup), to be matched in the generated text."""

    def __init__(self, model_path: Path) -> None:
        from llama_cpp import Llama

        self._vocab = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        self._texts: dict[tuple[tuple[int, ...], ...], tuple[str, ...]] = {}

    def texts(self, request: GenerationRequest) -> tuple[str, ...]:
        words = request.stop_word_ids
        if words not in self._texts:
            decoded = (
                self._vocab.detokenize(list(word), special=True).decode(errors="replace") for word in words
            )
            self._texts[words] = tuple(text for text in decoded if text)
        return self._texts[words]


class LlamaPool:
    """Generates with a pool of llama.cpp instances, one per concurrent request (they are not thread-safe)."""

    N_CTX = 4096

    def __init__(self, model_path: Path, instances: int) -> None:
        from llama_cpp import Llama

        threads = max(1, (os.cpu_count() or 1) // instances)
        self._free: queue.Queue[Any] = queue.Queue()
        self.stop_words = StopWords(model_path)
        for _ in range(instances):
            self._free.put(
                Llama(
                    model_path=str(model_path),
                    n_ctx=self.N_CTX,
                    n_threads=threads,
                    n_threads_batch=threads,
                    verbose=False,
                )
            )

    def generate(self, request: GenerationRequest) -> Generator[bytes, None, None]:
        """Yield the bytes of each generated token (a token can end inside a character, as TensorRT-LLM's
        can); blocking, one llama.cpp instance held throughout."""
        stops = tuple(word.encode() for word in self.stop_words.texts(request))
        prompt = list(request.prompt_ids)
        if not 0 < len(prompt) < self.N_CTX:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this model takes 1 to {self.N_CTX - 1}")
        max_tokens = min(request.max_tokens, self.N_CTX - len(prompt))
        llm = self._free.get()
        try:
            end_id = request.end_id if request.end_id is not None else llm.token_eos()
            # Forget the previous prompt: reusing its cached prefix evaluates the new prompt in different
            # batches, which shifts the logits slightly, enough to break seeded reproducibility.
            llm.reset()
            # As llama-cpp-python's create_completion seeds and samples (min_p etc. at its defaults), but
            # from the ids as sent: a text prompt would be tokenized again with special tokens parsed.
            llm.set_seed(request.seed if request.seed is not None else random.randrange(2**32))
            tokens = llm.generate(prompt, top_k=request.top_k, top_p=request.top_p, temp=request.temperature)
            generated = b""
            try:
                for count, token in enumerate(tokens, start=1):
                    if token == end_id:
                        return  # TensorRT-LLM semantics: the end token ends the output, unsent
                    yield llm.detokenize([token])
                    # TensorRT-LLM semantics: the stop word's own tokens are part of the output.
                    generated += llm.detokenize([token], special=True)
                    if count >= max_tokens or any(word in generated for word in stops):
                        return
            finally:
                tokens.close()
        finally:
            self._free.put(llm)


class TritonLlamaModel:
    """The pytriton inference callable: an async generator, so Triton can interleave requests."""

    def __init__(self, pool: LlamaPool) -> None:
        self._pool = pool

    async def infer(self, requests: Sequence[Any]) -> AsyncIterator[list[dict[str, npt.NDArray[Any]]]]:
        """Stream `text_output` responses for the single request Triton hands over (batching is off)."""
        (request,) = requests
        params = GenerationRequest.from_tensors(request)
        pieces = self._pool.generate(params)
        done = object()
        collected = b""
        try:
            while True:
                # llama.cpp blocks for a whole token; a worker thread keeps pytriton's event loop free.
                piece = await asyncio.to_thread(next, pieces, done)
                if piece is done:
                    break
                assert isinstance(piece, bytes)
                if params.stream:
                    yield [_text_output(piece)]
                else:
                    collected += piece
            if not params.stream:
                yield [_text_output(collected)]
        finally:
            # ValueError: the generator is still running in a worker thread whose await was cancelled
            # (pytriton cancels its tasks on shutdown); it will finish there on its own.
            with contextlib.suppress(ValueError):
                await asyncio.to_thread(pieces.close)


FIXED_WORDS = tuple(
    f" {word}"
    for word in (
        *("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "seven"),
        *("bright", "stars", "shine", "above", "a", "quiet", "harbour", "where", "old", "boats"),
        *("rest", "and", "gulls", "circle", "slowly", "in", "the", "evening", "light"),
    )
)
"""The fixed engine's output, cycled: one word (with its leading space) per token."""


class FixedTokenModel:
    """The fast stand-in engine: the same tensors as the llama.cpp one, but each token is the next word of
    `FIXED_WORDS`, produced in no time (or paced at `tokens_per_s` per stream), so what a benchmark
    measures is Triton and the path around it, as with a GPU engine."""

    def __init__(self, tokens_per_s: float, stop_words: StopWords, report_lengths: bool = False) -> None:
        self._interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self._stop_words = stop_words
        self._report_lengths = report_lengths

    async def infer(self, requests: Sequence[Any]) -> AsyncIterator[list[dict[str, npt.NDArray[Any]]]]:
        """Stream `max_tokens` words (fewer if a stop word completes), one response each."""
        (request,) = requests
        params = GenerationRequest.from_tensors(request)
        stops = self._stop_words.texts(params)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        generated = ""
        for index in range(params.max_tokens):
            piece = FIXED_WORDS[index % len(FIXED_WORDS)]
            if self._interval_s:
                next_at += self._interval_s
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            generated += piece
            if params.stream:
                yield [_token_response(self._report_lengths, piece, 1)]
            if any(word in generated for word in stops):
                break
        if not params.stream:
            yield [_token_response(self._report_lengths, generated, index + 1)]


class DecoderModel:
    """A tiny random-weight decoder in torch (token embedding, a 2-layer GRU, an output projection) whose
    vocabulary is the words of `FIXED_WORDS`: each token is one word, so the relay benchmark counts tokens
    the same way as with the fixed engine. It runs on the GPU when CUDA is present, else on the CPU, one
    step per token with its recurrent state as the cache: a stand-in for a GPU engine that really
    computes every token. Greedy (`top_k` 1 or temperature 0) or sampled with the request's temperature and
    seed."""

    WIDTH = 256

    def __init__(
        self, stop_words: StopWords, report_lengths: bool = False, device: str | None = None
    ) -> None:
        import torch

        self._torch = torch
        self._stop_words = stop_words
        self._report_lengths = report_lengths
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._vocabulary = tuple(dict.fromkeys(FIXED_WORDS))
        generator = torch.Generator().manual_seed(0)
        size = len(self._vocabulary)
        with torch.device(self.device):
            self._embedding = torch.nn.Embedding(size, self.WIDTH)
            self._cell = torch.nn.GRU(self.WIDTH, self.WIDTH, num_layers=2, batch_first=True)
            self._head = torch.nn.Linear(self.WIDTH, size)
        for parameter in (*self._embedding.parameters(), *self._cell.parameters(), *self._head.parameters()):
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        # Steps of different streams must not interleave on one device queue from many threads.
        self._lock = threading.Lock()

    def _steps(self, params: GenerationRequest) -> Generator[str, None, None]:
        torch = self._torch
        greedy = params.top_k == 1 or params.temperature <= 0
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else 0)
        # The prompt's ids pick the first token, so different prompts start differently.
        token = torch.tensor([[sum(params.prompt_ids) % len(self._vocabulary)]], device=self.device)
        state = None
        for _ in range(params.max_tokens):
            with self._lock, torch.inference_mode():
                hidden, state = self._cell(self._embedding(token), state)
                logits = self._head(hidden[:, -1])
                if greedy:
                    token = logits.argmax(dim=-1, keepdim=True)
                else:
                    probabilities = torch.softmax(logits / params.temperature, dim=-1)
                    token = torch.multinomial(probabilities, 1, generator=generator)
                index = int(token.item())
            yield self._vocabulary[index]

    async def infer(self, requests: Sequence[Any]) -> AsyncIterator[list[dict[str, npt.NDArray[Any]]]]:
        """Stream `max_tokens` words (fewer if a stop word completes), one response each; each step runs
        in a worker thread so that concurrent streams take turns on the device."""
        (request,) = requests
        params = GenerationRequest.from_tensors(request)
        stops = self._stop_words.texts(params)
        steps = self._steps(params)
        generated = ""
        count = 0
        while (piece := await asyncio.to_thread(next, steps, None)) is not None:
            generated += piece
            count += 1
            if params.stream:
                yield [_token_response(self._report_lengths, piece, 1)]
            if any(word in generated for word in stops):
                break
        if not params.stream:
            yield [_token_response(self._report_lengths, generated, count)]


def _token_response(report_lengths: bool, text: str, tokens: int) -> dict[str, npt.NDArray[Any]]:
    """A streamed response of the stand-in engines: `text`, and with `report_lengths` its token count as
    deploy/triton's ensemble reports TensorRT-LLM's (`output_length`)."""
    response = _text_output(text)
    if report_lengths:
        response["output_length"] = np.array([[tokens]], dtype=np.int32)
    return response


def _text_output(text: str | bytes) -> dict[str, npt.NDArray[Any]]:
    data = text.encode() if isinstance(text, str) else text
    return {"text_output": np.array([[data]], dtype=np.object_)}


InferFunc = Callable[[Sequence[Any]], AsyncIterator[list[dict[str, npt.NDArray[Any]]]]]


def recording(infer: InferFunc, path: Path) -> InferFunc:
    """`infer`, appending each request's token-id inputs to `path` (one JSON line, written before the
    first response) for tests to check what the model was sent."""

    async def infer_and_record(requests: Sequence[Any]) -> AsyncIterator[list[dict[str, npt.NDArray[Any]]]]:
        for request in requests:
            line = json.dumps(GenerationRequest.from_tensors(request).record())
            with path.open("a") as records:
                records.write(line + "\n")
        async for responses in infer(requests):
            yield responses

    return infer_and_record


def _say(line: str) -> None:
    # One write call (print() writes text and newline separately) keeps the line in one piece while
    # another thread relays Triton's log to stdout.
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def _triton_model_copies() -> list[Path]:
    """The directories under /tmp where our tritonserver put the model files pytriton uploaded.

    Triton deletes such a copy when the model unloads, but after a client cancelled a stream the
    Python backend stub sometimes hangs in finalize (a pytriton / python-backend issue), Triton gives
    up after exit_timeout_secs and leaves the copy behind. They are found through the stub processes,
    whose first argument is `<copy>/1/model.py`.
    """
    ours = {os.getpid()}
    copies = []
    # Two generations below us: tritonserver is our child, the stubs are its children.
    for _ in range(2):
        children = {pid for pid, ppid in _processes() if ppid in ours}
        ours |= children
    for pid in ours:
        argv = _argv(pid)
        if len(argv) > 1 and argv[0].endswith("triton_python_backend_stub"):
            copy = Path(argv[1]).parents[1]
            if copy.parent == Path("/tmp") and copy.name.startswith("folder"):
                copies.append(copy)
    return copies


def _processes() -> Iterator[tuple[int, int]]:
    """(pid, parent pid) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield int(entry.name), int((entry / "stat").read_text().rpartition(")")[2].split()[1])


def _argv(pid: int) -> list[str]:
    try:
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _with_libpython_on_library_path() -> None:
    # The python backend stub shipped with pytriton is linked against libpython3.x.so; without the
    # interpreter's LIBDIR on the path the model fails to load ("libpython3.11.so.1.0: cannot open").
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def serve(args: argparse.Namespace) -> None:
    """Start Triton with the model bound, print READY, and block until SIGTERM/SIGINT."""
    _with_libpython_on_library_path()
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from inference_service.model_files import bundled_gguf_path

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    model: TritonLlamaModel | FixedTokenModel | DecoderModel
    gguf = args.gguf or bundled_gguf_path()
    if args.engine == "fixed":
        model = FixedTokenModel(args.tokens_per_s, StopWords(gguf), args.report_lengths)
    elif args.engine == "decoder":
        model = DecoderModel(StopWords(gguf), args.report_lengths)
        log.warning("decoder engine on %s", model.device)
    else:
        model = TritonLlamaModel(LlamaPool(gguf, args.instances))
    infer: InferFunc = model.infer
    if args.record_inputs is not None:
        infer = recording(infer, args.record_inputs)
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        # How long Triton waits on shutdown for in-flight generations and the model to unload (~2 s).
        exit_timeout_secs=5,
        log_verbose=args.log_verbose,
        log_file=args.log_file,
    )

    def scalar(name: str, dtype: type[Any]) -> Tensor:
        return Tensor(name=name, dtype=dtype, shape=(-1, -1), optional=True)

    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=[
                Tensor(name="input_ids", dtype=np.int32, shape=(-1, -1)),
                scalar("input_lengths", np.int32),
                scalar("max_tokens", np.int32),
                scalar("end_id", np.int32),
                scalar("pad_id", np.int32),
                Tensor(name="stop_words_list", dtype=np.int32, shape=(-1, -1, -1), optional=True),
                scalar("stream", np.bool_),
                scalar("temperature", np.float32),
                scalar("top_p", np.float32),
                scalar("top_k", np.int32),
                scalar("random_seed", np.uint64),
            ],
            outputs=[
                Tensor(name="text_output", dtype=bytes, shape=(-1, -1)),
                *(
                    [Tensor(name="output_length", dtype=np.int32, shape=(-1, -1))]
                    if args.report_lengths
                    else []
                ),
            ],
            config=ModelConfig(batching=False, decoupled=True),
            strict=False,
        )
        triton.run()
        model_copies = _triton_model_copies()
        _say("READY")
        try:
            while not stop.wait(0.5):
                if not triton.is_alive():
                    log.error("Triton exited unexpectedly")
                    sys.exit(1)
        finally:
            # Leaving the `with` stops tritonserver (SIGINT, then wait) and removes pytriton's workspace.
            triton.stop()
            for path in model_copies:
                shutil.rmtree(path, ignore_errors=True)
    _say("STOPPED")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-name", default="ensemble")
    parser.add_argument("--instances", type=int, default=2, help="llama.cpp instances (concurrent requests)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="write Triton's log here instead of stdout, where pytriton relays it in arbitrary chunks",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="GGUF model (and the vocabulary stop words are read with); default: the bundled Gemma",
    )
    parser.add_argument(
        "--record-inputs",
        type=Path,
        default=None,
        help="append each request's token-id inputs to this file, one JSON line per request",
    )
    parser.add_argument(
        "--engine",
        choices=("llama", "fixed", "decoder"),
        default="llama",
        help="llama.cpp, the fixed token source, or a tiny torch decoder (GPU when CUDA is present)",
    )
    parser.add_argument(
        "--tokens-per-s",
        type=float,
        default=0.0,
        help="fixed engine: pace per stream (0: as fast as it goes)",
    )
    parser.add_argument(
        "--report-lengths",
        action="store_true",
        help="fixed and decoder engines: an output_length output with each response's token count, as"
        " TensorRT-LLM's",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(args)


if __name__ == "__main__":
    main()
