"""deploy/triton: every config.pbtxt parses as a Triton model config, the ensemble's steps are wired
consistently, and its tensors are the ones the inference service's triton backend sends and reads: the
prompt as token ids, with no preprocessing model that would tokenize text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from inference_service.backends.base import ModelInfo, Prompt, Sampling
from inference_service.backends.triton import TritonBackend, TritonTensorNames
from inference_service.prompt import TEMPLATES
from inference_service.settings import InferenceSettings

REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "triton"
# The wire datatype of each config data type the backend sends.
DATATYPES = {
    model_config_pb2.TYPE_INT32: "INT32",
    model_config_pb2.TYPE_FP32: "FP32",
    model_config_pb2.TYPE_UINT64: "UINT64",
    model_config_pb2.TYPE_BOOL: "BOOL",
    model_config_pb2.TYPE_STRING: "BYTES",
}


def models() -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for path in sorted(REPOSITORY.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name, f"{path}: name {config.name!r} is not its folder's"
        assert (path.parent / "1").is_dir(), f"{path.parent.name} has no version folder 1/"
        configs[config.name] = config
    return configs


class CharTokenizer:
    prefix: Sequence[int] = (2,)

    def encode(self, text: str, *, special: bool) -> list[int]:
        return [ord(c) for c in text]


def sent_tensors(sampling: Sampling) -> dict[str, tuple[str, list[int]]]:
    """What the backend sends for `sampling`: each input's datatype and shape."""
    backend = TritonBackend(
        None,  # type: ignore[arg-type]
        CharTokenizer(),
        TEMPLATES["transcript"],
        url="127.0.0.1:1",
        model="ensemble",
        info=ModelInfo("m", 4096, "triton"),
        timeout_s=30.0,
        end_id=1,
        pad_id=0,
    )
    request = backend._request(Prompt(text="", token_ids=[2, 3, 4], message_tokens=(2,)), sampling)
    return {tensor.name: (tensor.datatype, list(tensor.shape)) for tensor in request.inputs}


def test_the_repository_has_no_preprocessing_model() -> None:
    # The prompt is tokenized by the inference service: user text is never parsed for special tokens.
    assert set(models()) == {"ensemble", "tensorrt_llm", "postprocessing"}
    assert models()["tensorrt_llm"].model_transaction_policy.decoupled, "streams tokens as they come"


def test_the_ensemble_takes_token_ids_and_no_text() -> None:
    ensemble = models()["ensemble"]
    assert all(tensor.data_type != model_config_pb2.TYPE_STRING for tensor in ensemble.input)
    first = ensemble.ensemble_scheduling.step[0]
    assert first.model_name == "tensorrt_llm"
    assert first.input_map["input_ids"] == TritonTensorNames().input_ids


def test_the_ensemble_takes_and_returns_what_the_triton_backend_uses() -> None:
    ensemble = models()[InferenceSettings(address="127.0.0.1:1").triton_model]
    names = TritonTensorNames()
    inputs = {tensor.name: tensor for tensor in ensemble.input}
    outputs = {tensor.name for tensor in ensemble.output}
    read = {names.text_output, names.output_length}
    named = {getattr(names, f.name) for f in fields(names)} - read
    assert named <= set(inputs), f"named but not accepted: {sorted(named - set(inputs))}"
    assert read <= outputs, "the text, and the token counts that make usage exact"

    # Every input of a greedy, seeded request with stops (all there are), and of a plain one (the
    # fewest): the names, datatypes and shapes (batch dimension first) are the ensemble's, and the
    # ensemble's required inputs are always sent.
    everything = Sampling(max_tokens=5, temperature=0.0, top_p=0.9, seed=3, stop=("\nUser:", "x"))
    plain = Sampling(max_tokens=5, temperature=0.7, top_p=1.0, seed=None, stop=())
    for sampling in (everything, plain):
        sent = sent_tensors(sampling)
        assert set(sent) <= set(inputs), f"sent but not accepted: {sorted(set(sent) - set(inputs))}"
        required = {name for name, tensor in inputs.items() if not tensor.optional}
        assert required <= set(sent), f"required but not sent: {sorted(required - set(sent))}"
        for name, (datatype, shape) in sent.items():
            tensor = inputs[name]
            assert datatype == DATATYPES[tensor.data_type], name
            assert len(shape) == 1 + len(tensor.dims), name
            assert all(dim in (-1, size) for dim, size in zip(tensor.dims, shape[1:], strict=True)), name
    assert set(sent_tensors(everything)) == named, "a request with everything set sends every input"


def test_every_step_maps_tensors_its_model_has_from_tensors_that_exist_by_then() -> None:
    configs = models()
    ensemble = configs["ensemble"]
    available = {tensor.name: tensor for tensor in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        model_inputs = {tensor.name: tensor for tensor in model.input}
        model_outputs = {tensor.name: tensor for tensor in model.output}
        assert set(step.input_map) <= set(model_inputs), (
            step.model_name,
            set(step.input_map) - set(model_inputs),
        )
        assert set(step.input_map.values()) <= set(available), (
            step.model_name,
            set(step.input_map.values()) - set(available),
        )
        for key, value in step.input_map.items():
            # Same data type and shape on both sides of the map (ensemble inputs straight into a model).
            assert available[value].data_type == model_inputs[key].data_type, (step.model_name, key)
            assert list(available[value].dims) == list(model_inputs[key].dims), (step.model_name, key)
        required = {tensor.name for tensor in model.input if not tensor.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        assert set(step.output_map) <= set(model_outputs), (
            step.model_name,
            set(step.output_map) - set(model_outputs),
        )
        available |= {value: model_outputs[key] for key, value in step.output_map.items()}
    assert {tensor.name for tensor in ensemble.output} <= set(available)
