"""read_header on safetensors files from strangers: a clean ValueError or a correct result."""

import json
import random
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from zeropoint.modeldir.source import read_header, read_rows


def _raw(header, data: bytes = b"\0" * 64) -> bytes:
    text = header if isinstance(header, (bytes, str)) else json.dumps(header)
    text = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(text)) + text + data


def _entry(dtype="F32", shape=(2, 4), offsets=(0, 32)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, message", [
    ([1, 2], "not an object"),
    ({"w": [1]}, "not an object"),
    ({"w": _entry(dtype=["F32"])}, "dtype"),
    ({"w": _entry(dtype="F33")}, "dtype"),
    ({"w": {"dtype": "F32", "shape": "2,4", "data_offsets": [0, 32]}}, "shape"),
    ({"w": _entry(shape=("x", 4))}, "shape"),
    ({"w": _entry(shape=(2.5, 4))}, "shape"),
    ({"w": _entry(shape=(-1, 4), offsets=(16, 0))}, "shape"),
    ({"w": _entry(shape=(True, 4))}, "shape"),
    ({"w": _entry(shape=(0, 2**70), offsets=(0, 8))}, "data_offsets"),
    ({"w": _entry(shape=(2**40, 2**40), offsets=(0, 32))}, "data_offsets"),
    ({"w": _entry(offsets=(0, 32, 64))}, "data_offsets"),
    ({"w": _entry(offsets=(-8, 24))}, "data_offsets"),
    ({"w": _entry(offsets=(40, 72))}, "data_offsets"),  # past the end of the data
    ({"a": _entry(), "b": _entry(offsets=(16, 48))}, "share bytes"),
    ("[" * 100_000 + "]" * 100_000, "corrupt"),  # deep nesting: RecursionError inside json
    (b"\xff\xfe{}", "corrupt"),
])
def test_malformed_headers_get_a_clean_error(tmp_path, header, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_raw(header))
    with pytest.raises(ValueError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_huge_header_length_is_refused_before_reading(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63 - 1) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        read_header(path)


def _valid_file(path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).view(3, 4),
               "b": torch.arange(6, dtype=torch.int16), "c": torch.ones(2, 2, dtype=torch.bfloat16)}
    save_file(tensors, str(path))
    return tensors


def test_seeded_mutations_give_a_clean_error_or_the_true_tensors(tmp_path):
    """2000 mutations of a real file's header bytes: each either fails with a ValueError, or
    reads tensors that lie inside the file, apart, and whose rows read back without error."""
    good = tmp_path / "good.safetensors"
    _valid_file(good)
    original = good.read_bytes()
    n = struct.unpack("<Q", original[:8])[0]
    rng = random.Random(0)
    path = tmp_path / "m.safetensors"
    outcomes = {"error": 0, "parsed": 0}
    for _ in range(2000):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(0, 8 + n)
            data[at] = rng.choice([rng.randrange(256), ord("9"), ord("-"), ord("["), ord('"'), 0xFF])
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data))]
        path.write_bytes(bytes(data))
        try:
            tensors = read_header(path)
        except ValueError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
            continue
        outcomes["parsed"] += 1
        size = len(data)
        spans = sorted((t.offset, t.offset + t.nbytes) for t in tensors)
        assert all(0 <= a <= b <= size for a, b in spans)
        assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:]))
        with open(path, "rb") as f:
            for t in tensors:
                assert read_rows(f.fileno(), t, 0, t.rows).numel() == t.numel
    assert outcomes["error"] > 100 and outcomes["parsed"] > 10, outcomes


def test_a_valid_file_reads_as_safetensors_reads_it(tmp_path):
    path = tmp_path / "v.safetensors"
    _valid_file(path)
    expected = load_file(str(path))
    with open(path, "rb") as f:
        got = {t.name: read_rows(f.fileno(), t, 0, t.rows).reshape(t.shape) for t in read_header(path)}
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t)
