"""The Triton backend's reading of a response's raw output bytes."""

from __future__ import annotations

from inference_service.backends.triton import _bytes_elements


def test_bytes_tensor_elements_are_read_from_the_wire_format() -> None:
    # Triton's BYTES tensor on the wire: each element a 4-byte little-endian length, then its bytes.
    elements = [b"", b" Paris", "é".encode(), b"x" * 300]
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    assert _bytes_elements(raw) == elements
    assert _bytes_elements(b"") == []
