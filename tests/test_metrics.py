import math

import pytest
import torch

from zeropoint import QuantSpec, cosine, max_abs_error, mse, sqnr_db, uniform_noise_mse
from zeropoint import QTensor


def test_metrics_on_known_values():
    ref = torch.tensor([1.0, -1.0, 1.0, -1.0])
    approx = ref + torch.tensor([0.1, -0.1, 0.1, -0.1])
    assert mse(ref, approx) == pytest.approx(0.01)
    assert sqnr_db(ref, approx) == pytest.approx(20.0)
    assert max_abs_error(ref, approx) == pytest.approx(0.1)
    assert cosine(ref, approx) == pytest.approx(1.0)
    assert cosine(ref, -ref) == pytest.approx(-1.0)


def test_exact_reconstruction_is_infinite_sqnr_not_nan():
    x = torch.randn(10)
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert cosine(torch.zeros(3), torch.zeros(3)) == 1.0


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        mse(torch.zeros(3), torch.zeros(4))


def test_uniform_noise_model_predicts_the_mse_of_fine_quantization(gen):
    # Widrow: with steps much finer than the signal, rounding error is uniform on a step.
    x = torch.randn(1_000_000, generator=gen)
    q = QTensor.quantize(x, QuantSpec(8, "symmetric"))
    assert mse(x, q.dequantize()) == pytest.approx(uniform_noise_mse(q.scale), rel=0.01)
    assert uniform_noise_mse(torch.tensor([0.1, 0.2])) == pytest.approx((0.01 + 0.04) / 2 / 12)
