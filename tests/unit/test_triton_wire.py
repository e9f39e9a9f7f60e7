"""The Triton backend's reading of a response's raw output bytes."""

from __future__ import annotations

from inference_service.backends.triton import TritonTensorNames, _bytes_elements


def test_bytes_tensor_elements_are_read_from_the_wire_format() -> None:
    # Triton's BYTES tensor on the wire: each element a 4-byte little-endian length, then its bytes.
    elements = [b"", b" Paris", "é".encode(), b"x" * 300]
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    assert _bytes_elements(raw) == elements
    assert _bytes_elements(b"") == []


def test_inputs_carry_the_bytes_numpy_would_have_given() -> None:
    # The backend builds its input tensors without numpy; tritonclient's own path must agree.
    import numpy as np
    import tritonclient.grpc.aio as triton_grpc

    from inference_service.backends.base import Sampling
    from inference_service.backends.triton import TritonBackend

    backend = TritonBackend.__new__(TritonBackend)
    backend._tensors = TritonTensorNames()
    sampling = Sampling(max_tokens=7, temperature=0.0, top_p=0.9, seed=2**40 + 3, stop=("\nUser:", "é"))
    built = {tensor.name(): tensor for tensor in backend._inputs("Hello, world", sampling)}
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
    assert set(built) == set(expected)
    for name, (array, datatype) in expected.items():
        reference = triton_grpc.InferInput(name, list(array.shape), datatype)
        reference.set_data_from_numpy(array)
        assert built[name]._get_content() == reference._get_content(), name
        assert list(built[name].shape()) == list(reference.shape()), name
        assert built[name].datatype() == datatype, name
