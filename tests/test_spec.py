import pytest
import torch

from zeropoint import QuantSpec


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_code_ranges(bits):
    full = QuantSpec(bits, "symmetric")
    narrow = QuantSpec(bits, "symmetric", narrow_range=True)
    assert (full.qmin, full.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (narrow.qmin, narrow.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert full.code_dtype == torch.int8


@pytest.mark.parametrize("bits", range(1, 9))
def test_asymmetric_code_range_fits_dtype(bits):
    spec = QuantSpec(bits, "asymmetric")
    assert (spec.qmin, spec.qmax) == (0, 2**bits - 1)
    info = torch.iinfo(spec.code_dtype)
    assert info.min <= spec.qmin and spec.qmax <= info.max


@pytest.mark.parametrize("bits", [0, 9, 12, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=rf"bits must be 1..8, got {bits}"):
        QuantSpec(bits)


def test_one_bit_symmetric_is_refused_but_asymmetric_allowed():
    with pytest.raises(ValueError, match="at least 2 bits"):
        QuantSpec(1, "symmetric")
    assert QuantSpec(1, "asymmetric").qmax == 1


def test_unknown_scheme_and_granularity_name_what_is_accepted():
    with pytest.raises(ValueError, match="unknown scheme 'affine'.*'symmetric'"):
        QuantSpec(8, "affine")
    with pytest.raises(ValueError, match="unknown granularity 'per_row'.*'per_group'"):
        QuantSpec(8, "symmetric", "per_row")


def test_spec_is_frozen_and_round_trips_through_dict():
    spec = QuantSpec(4, "symmetric", "per_group", axis=0, group_size=32, narrow_range=True)
    with pytest.raises(Exception):
        spec.bits = 3
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_block_sizes():
    assert QuantSpec(8).block_size((4, 6)) == (4, 6)
    assert QuantSpec(8, granularity="per_channel").block_size((4, 6)) == (1, 6)
    assert QuantSpec(8, granularity="per_channel", axis=1).block_size((4, 6)) == (4, 1)
    assert QuantSpec(8, granularity="per_group", group_size=3).block_size((4, 6)) == (1, 3)
    assert QuantSpec(8, granularity="per_group", group_size=2, axis=0).block_size((4, 6)) == (2, 1)


def test_group_size_that_does_not_divide_leaves_a_shorter_last_group():
    from zeropoint.core import grid_shape, padded_shape

    spec = QuantSpec(4, granularity="per_group", group_size=128)
    assert spec.block_size((8, 576)) == (1, 128)
    assert padded_shape((8, 576), spec) == (8, 640)
    assert grid_shape((8, 576), spec) == (8, 5)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis 2 is out of range.*-2..1"):
        QuantSpec(8, granularity="per_channel", axis=2).block_size((3, 4))


def test_inconsistent_options():
    with pytest.raises(ValueError, match="per_group needs group_size"):
        QuantSpec(4, granularity="per_group")
    with pytest.raises(ValueError, match="group_size is for granularity 'per_group'"):
        QuantSpec(4, granularity="per_channel", group_size=32)
    with pytest.raises(ValueError, match="narrow_range applies to the symmetric scheme only"):
        QuantSpec(4, "asymmetric", narrow_range=True)
