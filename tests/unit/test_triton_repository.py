"""deploy/triton: every config.pbtxt parses as a Triton model config, the ensemble's steps are wired
consistently, and its tensors are the ones the inference service's triton backend sends and reads."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from inference_service.backends.triton import TritonTensorNames
from inference_service.settings import InferenceSettings

REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "triton"


def models() -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for path in sorted(REPOSITORY.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name, f"{path}: name {config.name!r} is not its folder's"
        assert (path.parent / "1").is_dir(), f"{path.parent.name} has no version folder 1/"
        configs[config.name] = config
    return configs


def test_the_repository_has_tensorrt_llms_four_models() -> None:
    assert set(models()) == {"ensemble", "preprocessing", "tensorrt_llm", "postprocessing"}
    assert models()["tensorrt_llm"].model_transaction_policy.decoupled, "streams tokens as they come"


def test_the_ensemble_takes_and_returns_what_the_triton_backend_uses() -> None:
    ensemble = models()[InferenceSettings(address="127.0.0.1:1").triton_model]
    names = TritonTensorNames()
    inputs = {tensor.name for tensor in ensemble.input}
    outputs = {tensor.name for tensor in ensemble.output}
    read = {names.text_output, names.output_length}
    sent = {getattr(names, f.name) for f in fields(names)} - read
    assert sent <= inputs, f"sent but not accepted: {sorted(sent - inputs)}"
    assert read <= outputs, "the text, and the token counts that make usage exact"


def test_every_step_maps_tensors_its_model_has_from_tensors_that_exist_by_then() -> None:
    configs = models()
    ensemble = configs["ensemble"]
    available = {tensor.name for tensor in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        model_inputs = {tensor.name for tensor in model.input}
        model_outputs = {tensor.name for tensor in model.output}
        assert set(step.input_map) <= model_inputs, (step.model_name, set(step.input_map) - model_inputs)
        assert set(step.input_map.values()) <= available, (
            step.model_name,
            set(step.input_map.values()) - available,
        )
        required = {tensor.name for tensor in model.input if not tensor.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        assert set(step.output_map) <= model_outputs, (step.model_name, set(step.output_map) - model_outputs)
        available |= set(step.output_map.values())
    assert {tensor.name for tensor in ensemble.output} <= available
