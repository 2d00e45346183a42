"""The wire codec: payload encoding, chunked streaming, hash checks."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedbrats import wire
from fedbrats.errors import WireError

DTYPES = st.sampled_from(["float32", "float64", "int32", "int64", "uint32", "uint64", "uint8"])


@st.composite
def tensor_dicts(draw):
    n = draw(st.integers(0, 4))
    out = {}
    for i in range(n):
        dt = draw(DTYPES)
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
        out[f"t{i}"] = draw(hnp.arrays(np.dtype(dt), shape))
    return out


@settings(max_examples=60, deadline=None)
@given(tensor_dicts(), st.integers(1, 64))
def test_pack_unpack_is_identity(tensors, chunk):
    payload = wire.pack_tensors(tensors, chunk_size=chunk)
    assert payload.info.sha256 == hashlib.sha256(payload.data).digest()
    asm = wire.PayloadAssembler(payload.info)
    for i, data in payload.chunks():
        assert len(data) <= chunk
        asm.add(i, data)
    back = wire.unpack_tensors(asm.finish())
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_known_bytes_layout():
    p = wire.pack_tensors({"a": np.array([1, 2], np.uint32), "b": np.array([[1.5]], np.float32)})
    assert p.data == bytes.fromhex("01000000" "02000000" "0000c03f")
    assert [(s.name, s.offset, s.nbytes, s.shape) for s in p.info.tensors] == [
        ("a", 0, 8, (2,)), ("b", 8, 4, (1, 1))]
    assert p.info.sha256.hex() == hashlib.sha256(p.data).hexdigest()


def _payload():
    return wire.pack_tensors({"w": np.arange(1000, dtype=np.float32)}, chunk_size=1000)


def test_out_of_order_chunk_refused():
    p = _payload()
    asm = wire.PayloadAssembler(p.info)
    chunks = list(p.chunks())
    with pytest.raises(WireError, match="chunk 1 arrived, expected chunk 0"):
        asm.add(*chunks[1])


def test_oversized_and_excess_chunks_refused():
    p = _payload()
    asm = wire.PayloadAssembler(p.info)
    with pytest.raises(WireError, match="limit 1000"):
        asm.add(0, b"x" * 1001)
    asm = wire.PayloadAssembler(p.info)
    for i, c in p.chunks():
        asm.add(i, c)
    with pytest.raises(WireError, match="exceeds the announced"):
        asm.add(4, b"x")


def test_truncated_and_tampered_payloads_refused():
    p = _payload()
    asm = wire.PayloadAssembler(p.info)
    asm.add(0, next(p.chunks())[1])
    with pytest.raises(WireError, match="incomplete"):
        asm.finish()
    asm = wire.PayloadAssembler(p.info)
    for i, c in p.chunks():
        asm.add(i, c if i != 2 else bytes([c[0] ^ 1]) + c[1:])
    with pytest.raises(WireError, match="SHA-256 mismatch"):
        asm.finish()


def test_header_that_lies_about_layout_refused():
    p = _payload()
    bad = wire.PayloadInfo("plain", (wire.TensorSpec("w", "float32", (999,), 0, 4000),),
                           p.info.total_bytes, p.info.sha256, 1000)
    with pytest.raises(WireError, match="tensor 'w'"):
        wire.PayloadAssembler(bad)
    evil = wire.PayloadInfo("plain", (wire.TensorSpec("w", "object", (1,), 0, 8),), 8,
                            b"\0" * 32, 8)
    with pytest.raises(WireError, match="not allowed"):
        wire.PayloadAssembler(evil)


def test_disallowed_dtype_refused_on_pack():
    with pytest.raises(WireError, match="dtype"):
        wire.pack_tensors({"x": np.array(["a"], dtype=object)})
    with pytest.raises(WireError, match="chunk_size"):
        wire.pack_tensors({}, chunk_size=wire.CHUNK_SIZE + 1)
