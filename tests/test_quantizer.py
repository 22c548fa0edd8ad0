"""The chapter's Quantizer interface, and its listing's two defects, which must not recur."""

import pytest
import torch

from zeropoint import Quantizer, mse


def listing_quantize(tensor, bits, scheme):
    """The course chapter's listing as printed (with the dequantize it implies)."""
    qmin, qmax = 0, (1 << bits) - 1
    if scheme == "asymmetric":
        scale = (tensor.max() - tensor.min()) / (qmax - qmin)
        zero_point = torch.round(qmin - tensor.min() / scale)
    else:
        scale = tensor.abs().max() / (qmax // 2)
        zero_point = 0
    q = torch.clamp(torch.round(tensor / scale) + zero_point, qmin, qmax).to(torch.int8)
    return (q.float() - zero_point) * scale


@pytest.fixture(scope="module")
def normal():
    return torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_symmetric_keeps_negatives(normal, bits):
    # The listing clamps every negative code to 0: half of N(0,1)'s power is lost at any width.
    assert mse(normal, listing_quantize(normal, bits, "symmetric")) == pytest.approx(0.50, abs=0.03)
    qz = Quantizer(bits=bits, scheme="symmetric")
    codes = qz.quantize(normal)
    assert int(codes.min()) < 0
    assert bool(((qz.dequantize(codes) < 0) == (normal < -qz.scale / 2)).all())
    assert mse(normal, qz.dequantize(codes)) < 0.05


def test_8bit_asymmetric_codes_do_not_overflow(normal):
    # The listing casts codes up to 255 to int8: everything above 127 wraps to negative.
    assert mse(normal, listing_quantize(normal, 8, "asymmetric")) == pytest.approx(46.6, rel=0.01)
    qz = Quantizer(bits=8, scheme="asymmetric")
    codes = qz.quantize(normal)
    assert codes.dtype == torch.uint8 and int(codes.max()) == 255
    assert mse(normal, qz.dequantize(codes)) < 2e-4


def test_scale_and_zero_point_are_broadcastable_tensors():
    x = torch.randn(16, 32)
    qz = Quantizer(bits=4, scheme="asymmetric", granularity="per_channel")
    codes = qz.quantize(x)
    assert qz.scale.shape == (16, 1) and qz.zero_point.shape == (16, 1)
    manual = (codes.float() - qz.zero_point) * qz.scale  # the broadcasting the chapter implies
    assert torch.equal(manual, qz.dequantize(codes))
    pg = Quantizer(bits=3, scheme="symmetric", granularity="per_group", group_size=8, narrow_range=True)
    assert pg.quantize(x).shape == x.shape and pg.scale.shape == (16, 4)
    assert int(pg.zero_point.abs().max()) == 0


def test_dequantize_before_quantize_is_an_error():
    with pytest.raises(RuntimeError, match="quantize"):
        Quantizer().dequantize(torch.zeros(3, dtype=torch.uint8))
