from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeropoint import ckernels
from zeropoint.packing import pack, packed_nbytes, row_nbytes, rows_per_whole_bytes, unpack


def bitstream_reference(codes: list[int], bits: int) -> bytes:
    """The layout spelled out with Python integers: code i at bits [i*b, (i+1)*b), little-endian."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (i * bits)
    return stream.to_bytes(packed_nbytes(len(codes), bits), "little")


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_matches_bitstream_and_unpack_is_identity(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=70))
    t = torch.tensor(codes, dtype=torch.uint8)
    expected = bitstream_reference(codes, bits)
    for path in (ckernels.disabled, nullcontext):  # the portable torch code, then the C loops
        with path():
            packed = pack(t, bits)
            assert packed.dtype == torch.uint8
            assert bytes(packed.tolist()) == expected
            assert torch.equal(unpack(packed, bits, len(codes)), t)


@pytest.mark.parametrize(
    "bits,n,nbytes",
    [(4, 1000, 500), (2, 1000, 250), (6, 1000, 750), (1, 1000, 125), (3, 1000, 375), (5, 8, 5),
     (7, 9, 8), (8, 10, 10)],
)
def test_packed_sizes(bits, n, nbytes):
    assert pack(torch.zeros(n, dtype=torch.uint8), bits).numel() == nbytes


def test_named_layouts():
    # 4-bit: two codes per byte, the first in the low nibble.
    assert pack(torch.tensor([0x1, 0xA], dtype=torch.uint8), 4).tolist() == [0xA1]
    # 2-bit: four codes per byte.
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 6-bit: four codes in three bytes.
    assert pack(torch.tensor([63, 0, 63, 0], dtype=torch.uint8), 6).tolist() == [0x3F, 0xF0, 0x03]


def test_bad_bits_and_sizes():
    with pytest.raises(ValueError, match="bits must be 1..8"):
        pack(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="take 2 bytes, got 3"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), row_len=st.integers(1, 40), rows=st.integers(1, 12))
def test_blocks_of_whole_byte_rows_pack_on_their_own(bits, row_len, rows):
    """A block of rows_per_whole_bytes rows starts on a byte: packing the blocks one by one and
    concatenating gives the packed whole; row_nbytes is the bytes of one row when rows do."""
    unit = rows_per_whole_bytes(row_len, bits)
    codes = torch.randint(0, 2**bits, (unit * rows, row_len), dtype=torch.uint8)
    blocks = [pack(codes[i:i + unit], bits) for i in range(0, unit * rows, unit)]
    assert torch.equal(torch.cat(blocks), pack(codes, bits))
    if unit == 1:
        assert row_nbytes(row_len, bits) == row_len * bits // 8 == blocks[0].numel()
    else:
        assert row_nbytes(row_len, bits) is None
        assert (unit - 1) * row_len * bits % 8 != 0  # fewer rows end inside a byte
