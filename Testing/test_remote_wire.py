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
    with pytest.raises(InputError, match=r"does not match the frame \(rows, cols\) \(11, 13\)"):
        wire.decode_mask(wire.encode_mask(mask), shape=(11, 13))


def test_wire_refuses_a_decompression_bomb():
    bomb = wire.encode_array(np.zeros((512, 512, 512), np.uint8))[1]  # 128 MiB of zeros, tiny on the wire
    assert len(bomb) < 1 << 20
    decoder = wire.StreamDecoder(wire.ArrayHeader(np.uint8, (8, 64, 64)))
    with pytest.raises(InputError, match="longer than its header"):
        decoder.feed(bomb)
    assert len(decoder.buffer) <= 8 * 64 * 64  # it never grew past the declared size
