"""The wire format: arrays, packed bits and compressed bodies, round trips and rejections."""

import numpy as np
import pytest

from medsam2.errors import InputError
from medsam2.remote import wire


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, bool])
def test_wire_round_trip(dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(3, 5, 7)) * 50).astype(dtype)
    headers, body = wire.encode_array(arr)
    back = wire.decode_array(headers, body)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    mask = rng.random((13, 11)) > 0.5
    assert np.array_equal(wire.decode_mask(wire.encode_mask(mask)), mask)
    with pytest.raises(InputError, match=r"does not match the frame's \(rows, cols\) \(11, 13\)"):
        wire.decode_mask(wire.encode_mask(mask), shape=(11, 13))


def test_wire_refuses_a_decompression_bomb():
    bomb = wire.encode_array(np.zeros((512, 512, 512), np.uint8))[1]  # 128 MiB of zeros, tiny on the wire
    assert len(bomb) < 1 << 20
    decoder = wire.StreamDecoder(wire.ArrayHeader(np.uint8, (8, 64, 64)))
    with pytest.raises(InputError, match="longer than its header"):
        decoder.feed(bomb)
    assert len(decoder.buffer) <= 8 * 64 * 64  # it never grew past the declared size


# -- properties (Hypothesis) ------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

WIRE_DTYPES = st.sampled_from(["|b1", "|i1", "|u1", "<i2", ">i2", "<u2", "<i4", "<u4", "<i8", "<f2", "<f4", "<f8",
                               ">f4"])
ARRAYS = WIRE_DTYPES.flatmap(lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=1, max_dims=4,
                                                                                   max_side=9)))
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(arr=ARRAYS, codec=st.sampled_from(["zstd", "raw"]))
def test_any_array_round_trips_bit_exactly(arr, codec):
    headers, body = wire.encode_array(arr, codec=codec)
    back = wire.decode_array(headers, body)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tobytes() == np.ascontiguousarray(arr).tobytes()  # NaN payloads included
    if arr.dtype == np.bool_:  # one bit a pixel
        assert headers[wire.PACKED_HEADER] == "1"
        assert codec != "raw" or len(body) == (arr.size + 7) // 8


@PROPERTY
@given(mask=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, max_side=70)))
def test_any_mask_round_trips_with_its_digest(mask):
    encoded = wire.encode_mask(mask)
    assert np.array_equal(wire.decode_mask(encoded, mask.shape), mask)
    assert encoded["digest"] == wire.mask_bits(mask)[1]


@PROPERTY
@given(arr=ARRAYS, cut=st.integers(1, 64), extra=st.binary(min_size=1, max_size=64),
       codec=st.sampled_from(["zstd", "raw"]))
def test_a_body_that_is_not_what_its_header_says_is_refused(arr, cut, extra, codec):
    headers, body = wire.encode_array(arr, codec=codec)
    for bad in (body[:max(0, len(body) - cut)], body + extra):
        try:
            back = wire.decode_array(headers, bad)
        except InputError:
            continue
        # zstd may ignore bytes after a complete frame, and a raw body can only be refused by length
        assert codec == "zstd" and bad.startswith(body) and back.tobytes() == np.ascontiguousarray(arr).tobytes()


@PROPERTY
@given(headers=st.dictionaries(st.sampled_from([wire.DTYPE_HEADER, wire.SHAPE_HEADER, wire.CODEC_HEADER,
                                                wire.PACKED_HEADER]),
                               st.one_of(st.text(max_size=40), st.sampled_from(
                                   ["<i2", "|b1", "8,64,64", "[2, 3]", "1e999,2", "9" * 30 + ",1", "zstd", "raw",
                                    "1", "0", "-1,2", "<U8", "(2)i4"]))),
       body=st.binary(max_size=200))
def test_any_header_and_body_decode_or_raise_input_error(headers, body):
    """What a hostile client can send: the answer is an array of the declared kind, or InputError."""
    try:
        header = wire.ArrayHeader.from_headers(headers)
    except InputError:
        return
    assert header.dtype.kind in "biuf" and all(v > 0 for v in header.shape)
    if header.payload_bytes > 1 << 20:
        return  # a real receiver refuses these on the limits first
    try:
        arr = wire.decode_array(headers, body)
    except InputError:
        return
    assert arr.dtype == header.dtype and arr.shape == header.shape


@PROPERTY
@given(obj=st.one_of(st.none(), st.integers(), st.text(max_size=20), st.dictionaries(
    st.sampled_from(["shape", "bits", "digest"]),
    st.one_of(st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=4), st.text(max_size=30),
              st.integers()))))
def test_any_mask_object_decodes_or_raises_input_error(obj):
    try:
        mask = wire.decode_mask(obj, (2, 3))
    except InputError:
        return
    assert mask.dtype == np.bool_ and mask.shape == (2, 3)
