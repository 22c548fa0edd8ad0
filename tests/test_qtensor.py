import pytest
import torch
from safetensors.torch import save_file

import zeropoint.qtensor as qtensor_module
from zeropoint import QTensor, QuantSpec, choose_qparams, dequantize, quantize


@pytest.mark.parametrize("bits,bytes_per_1024", [(8, 1024), (6, 768), (5, 640), (4, 512), (3, 384), (2, 256), (1, 128)])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_packed_codes_take_bits_over_8_bytes(gen, bits, bytes_per_1024, scheme):
    if scheme == "symmetric" and bits == 1:
        pytest.skip("symmetric needs 2 bits")
    x = torch.randn(4, 1024, generator=gen)
    q = QTensor.quantize(x, QuantSpec(bits, scheme, "per_group", group_size=128))
    assert q.packed.numel() * q.packed.element_size() == 4 * bytes_per_1024
    zp_bytes = 0 if scheme == "symmetric" else 4 * 8
    assert q.nbytes == 4 * bytes_per_1024 + 4 * 8 * 4 + zp_bytes
    assert q.bits_per_weight == pytest.approx(8 * q.nbytes / x.numel())


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(4, "symmetric", "per_group", group_size=64), QuantSpec(3, "asymmetric", "per_channel"),
     QuantSpec(8, "symmetric", narrow_range=True), QuantSpec(1, "asymmetric"),
     QuantSpec(7, "asymmetric", "per_group", group_size=5, axis=0)],
    ids=lambda s: s.describe(),
)
def test_codes_and_dequantize_survive_packing(gen, spec):
    x = torch.randn(10, 128, generator=gen, dtype=torch.float64)
    scale, zp = choose_qparams(x, spec)
    codes = quantize(x, spec, scale, zp)
    q = QTensor.quantize(x, spec)
    assert torch.equal(q.codes(), codes)
    assert q.dequantize().dtype == torch.float64
    assert torch.equal(q.dequantize(), dequantize(codes, spec, scale, zp, torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_is_exact(tmp_path, gen, dtype):
    x = torch.randn(64, 96, generator=gen).to(dtype)
    q = QTensor.quantize(x, QuantSpec(5, "asymmetric", "per_group", group_size=32))
    path = tmp_path / "w.safetensors"
    q.save(path)
    back = QTensor.load(path)
    assert back.spec == q.spec and back.shape == q.shape and back.dtype == dtype
    assert torch.equal(back.packed, q.packed) and torch.equal(back.scale, q.scale)
    assert torch.equal(back.zero_point, q.zero_point)
    assert torch.equal(back.dequantize(), q.dequantize())
    assert path.stat().st_size < q.nbytes + 1024  # the file holds the packed bytes, not more


def test_failed_save_leaves_nothing(tmp_path, gen, monkeypatch):
    q = QTensor.quantize(torch.randn(8, 8, generator=gen), QuantSpec(4))

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(qtensor_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        q.save(tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_loading_another_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a zeropoint QTensor file"):
        QTensor.load(path)
