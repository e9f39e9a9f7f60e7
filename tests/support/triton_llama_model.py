"""A real Triton Inference Server on the CPU, serving a TensorRT-LLM-shaped model that runs llama.cpp.

Test support: stands in for a GPU Triton + TensorRT-LLM deployment. The model is decoupled and speaks the
tensor names of TensorRT-LLM's `ensemble` / `tensorrt_llm_bls` models:

    inputs   text_input BYTES [1,1]   max_tokens INT32 [1,1]   stream BOOL [1,1]
             temperature FP32 [1,1]   top_p FP32 [1,1]   top_k INT32 [1,1]   random_seed UINT64 [1,1]
             stop_words BYTES [1,N]                                      (all but text_input optional)
    output   text_output BYTES [1,1]  one response per generated token when streaming

Like TensorRT-LLM, the token that completes a stop word is still sent (so clients must cut it off), and
the stream ends right after. Generation uses the bundled Gemma 3 270M GGUF with llama-cpp-python, or with
`--engine fixed` a fixed token source: the words of a fixed text, one per response, as fast as Triton
takes them or at `--tokens-per-s` per stream, so that the relay around a GPU-speed engine can be
measured on a CPU (`benchmarks/triton_relay.py`); or with `--engine decoder` a tiny random-weight torch
decoder over a vocabulary of words, on the GPU when CUDA is present (else the CPU): real autoregressive
compute per token, greedy or sampled, as fast as the device runs it.

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
import logging
import os
import queue
import shutil
import signal
import sys
import sysconfig
import threading
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("triton_llama_model")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """The inputs of one Triton request, decoded from their tensors."""

    prompt: str
    max_tokens: int
    stream: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_words: tuple[str, ...]

    @classmethod
    def from_tensors(cls, inputs: Any) -> GenerationRequest:
        """Decode a pytriton request (a mapping of input name to numpy array, batch dimension first)."""

        def scalar(name: str, default: Any) -> Any:
            return inputs[name].flatten()[0].item() if name in inputs else default

        def text(value: bytes | str) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        seed = scalar("random_seed", None)
        stop_words = inputs["stop_words"].flatten() if "stop_words" in inputs else ()
        return cls(
            prompt=text(inputs["text_input"].flatten()[0]),
            max_tokens=int(scalar("max_tokens", 16)),
            stream=bool(scalar("stream", False)),
            temperature=float(scalar("temperature", 1.0)),
            top_p=float(scalar("top_p", 1.0)),
            # TensorRT-LLM's top_k=0 means "no top-k"; llama.cpp reads k <= 0 the same way.
            top_k=int(scalar("top_k", 0)),
            # llama.cpp seeds are 32-bit.
            seed=None if seed is None else int(seed) & 0xFFFFFFFF,
            stop_words=tuple(word for word in (text(w) for w in stop_words) if word),
        )


class LlamaPool:
    """Generates with a pool of llama.cpp instances, one per concurrent request (they are not thread-safe)."""

    def __init__(self, model_path: Path, instances: int) -> None:
        from llama_cpp import Llama

        threads = max(1, (os.cpu_count() or 1) // instances)
        self._free: queue.Queue[Any] = queue.Queue()
        for _ in range(instances):
            self._free.put(
                Llama(
                    model_path=str(model_path),
                    n_ctx=4096,
                    n_threads=threads,
                    n_threads_batch=threads,
                    verbose=False,
                )
            )

    def generate(self, request: GenerationRequest) -> Generator[str, None, None]:
        """Yield the text of each generated token; blocking, one llama.cpp instance held throughout."""
        llm = self._free.get()
        try:
            # Forget the previous prompt: reusing its cached prefix evaluates the new prompt in different
            # batches, which shifts the logits slightly, enough to break seeded reproducibility.
            llm.reset()
            chunks = llm.create_completion(
                request.prompt,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                seed=request.seed,
                stream=True,
            )
            generated = ""
            try:
                for chunk in chunks:
                    piece: str = chunk["choices"][0]["text"]
                    if not piece:
                        continue  # the closing chunk that only carries finish_reason
                    generated += piece
                    yield piece
                    # TensorRT-LLM semantics: the stop word's own tokens are part of the output.
                    if any(word in generated for word in request.stop_words):
                        return
            finally:
                chunks.close()
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
        collected = ""
        try:
            while True:
                # llama.cpp blocks for a whole token; a worker thread keeps pytriton's event loop free.
                piece = await asyncio.to_thread(next, pieces, done)
                if piece is done:
                    break
                assert isinstance(piece, str)
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

    def __init__(self, tokens_per_s: float, report_lengths: bool = False) -> None:
        self._interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self._report_lengths = report_lengths

    async def infer(self, requests: Sequence[Any]) -> AsyncIterator[list[dict[str, npt.NDArray[Any]]]]:
        """Stream `max_tokens` words (fewer if a stop word completes), one response each."""
        (request,) = requests
        params = GenerationRequest.from_tensors(request)
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
            if any(word in generated for word in params.stop_words):
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

    def __init__(self, report_lengths: bool = False, device: str | None = None) -> None:
        import torch

        self._torch = torch
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
        # The prompt's bytes pick the first token, so different prompts start differently.
        token = torch.tensor([[sum(params.prompt.encode()) % len(self._vocabulary)]], device=self.device)
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
        steps = self._steps(params)
        generated = ""
        count = 0
        while (piece := await asyncio.to_thread(next, steps, None)) is not None:
            generated += piece
            count += 1
            if params.stream:
                yield [_token_response(self._report_lengths, piece, 1)]
            if any(word in generated for word in params.stop_words):
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


def _text_output(text: str) -> dict[str, npt.NDArray[Any]]:
    return {"text_output": np.array([[text.encode()]], dtype=np.object_)}


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

    from inference_service.backends.llama_cpp import bundled_gguf_path

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    model: TritonLlamaModel | FixedTokenModel | DecoderModel
    if args.engine == "fixed":
        model = FixedTokenModel(args.tokens_per_s, args.report_lengths)
    elif args.engine == "decoder":
        model = DecoderModel(args.report_lengths)
        log.warning("decoder engine on %s", model.device)
    else:
        model = TritonLlamaModel(LlamaPool(args.gguf or bundled_gguf_path(), args.instances))
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
            infer_func=model.infer,
            inputs=[
                Tensor(name="text_input", dtype=bytes, shape=(-1, -1)),
                scalar("max_tokens", np.int32),
                scalar("stream", np.bool_),
                scalar("temperature", np.float32),
                scalar("top_p", np.float32),
                scalar("top_k", np.int32),
                scalar("random_seed", np.uint64),
                scalar("stop_words", bytes),
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
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF model; default: the bundled Gemma")
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
