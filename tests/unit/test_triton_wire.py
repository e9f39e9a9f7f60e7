"""The Triton backend's reading of a response's raw output bytes."""

from __future__ import annotations

from inference_service.backends.triton import TritonTensorNames, _bytes_elements


def test_bytes_tensor_elements_are_read_from_the_wire_format() -> None:
    # Triton's BYTES tensor on the wire: each element a 4-byte little-endian length, then its bytes.
    elements = [b"", b" Paris", "é".encode(), b"x" * 300]
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    assert _bytes_elements(raw) == elements
    assert _bytes_elements(b"") == []


def test_the_request_carries_the_inputs_tritonclient_would_have_sent() -> None:
    # The backend builds its request from the tensors' wire bytes; tritonclient's own numpy path (what
    # `stream_infer` would send) must agree, tensor by tensor.
    import numpy as np
    import tritonclient.grpc.aio as triton_grpc

    from inference_service.backends.base import Sampling
    from inference_service.backends.triton import TritonBackend

    backend = TritonBackend.__new__(TritonBackend)
    backend._tensors = TritonTensorNames()
    backend._model = "ensemble"
    sampling = Sampling(max_tokens=7, temperature=0.0, top_p=0.9, seed=2**40 + 3, stop=("\nUser:", "é"))
    request = backend._request("Hello, world", sampling)
    built = {
        tensor.name: (tensor, raw)
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
    }
    expected = {
        "text_input": (np.array([[b"Hello, world"]], dtype=np.object_), "BYTES"),
        "max_tokens": (np.array([[7]], dtype=np.int32), "INT32"),
        "stream": (np.array([[True]], dtype=np.bool_), "BOOL"),
        "temperature": (np.array([[1.0]], dtype=np.float32), "FP32"),
        "top_p": (np.array([[0.9]], dtype=np.float32), "FP32"),
        "top_k": (np.array([[1]], dtype=np.int32), "INT32"),
        "random_seed": (np.array([[2**40 + 3]], dtype=np.uint64), "UINT64"),
        "stop_words": (np.array([[b"\nUser:", "é".encode()]], dtype=np.object_), "BYTES"),
    }
    assert request.model_name == "ensemble" and request.id
    assert set(built) == set(expected)
    for name, (array, datatype) in expected.items():
        reference = triton_grpc.InferInput(name, list(array.shape), datatype)
        reference.set_data_from_numpy(array)
        tensor, raw = built[name]
        assert raw == reference._get_content(), name
        assert tensor == reference._get_tensor(), name
