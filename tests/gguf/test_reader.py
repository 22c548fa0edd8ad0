"""GGUF files in (zeropoint.gguf.reader): checked against gguf-py's GGUFReader, and bad files."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as V
from gguf_samples import METADATA, fresh, header, string, tensor_bytes, tensor_info, write_sample

from zeropoint.gguf.layout import tensor_nbytes
from zeropoint.gguf.reader import read_gguf
from zeropoint.gguf.writer import TensorData, write_gguf


@pytest.fixture
def written(tmp_path, gen):
    return write_sample(tmp_path, gen)


def test_our_reader_agrees_with_gguf_reader(written):
    path, tensors = written
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert ours.version == 3 and ours.alignment == 64 and ours.data_offset == theirs.data_offset
    assert list(ours.metadata) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, meta in METADATA.items():
        got = ours.metadata[key]
        assert (got.type, got.sub_type) == (meta.type, meta.sub_type), key
        if meta.type == V.FLOAT32 or meta.sub_type == V.FLOAT32:
            assert np.allclose(got.value, meta.value)
        else:
            assert got.value == meta.value, key
    for a, b, t in zip(ours.tensors, theirs.tensors, tensors):
        assert (a.name, a.type, a.offset, a.nbytes) == (b.name, b.tensor_type.name, b.data_offset,
                                                          b.n_bytes)
        assert a.shape == t.shape and a.nbytes == tensor_nbytes(t.type, t.shape)
        assert ours.raw(a).tobytes() == tensor_bytes(t.data)


@pytest.mark.slow
def test_default_model_header_matches_gguf_reader_and_copies_byte_for_byte(tmp_path):
    from zeropoint.models.source import default_model_path

    src = default_model_path()
    ours, theirs = read_gguf(src), gguf.GGUFReader(src)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.get(key) == field.contents(), key
    assert [(t.name, t.type, t.shape, t.offset) for t in ours.tensors] == [
        (t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), t.data_offset)
        for t in theirs.tensors]
    tensor_data = [TensorData(t.name, t.type, t.shape, ours.raw(t)) for t in ours.tensors]
    copy, encoded = tmp_path / "copy.gguf", tmp_path / "encoded.gguf"
    write_gguf(copy, read_gguf(src).metadata, tensor_data)
    assert copy.read_bytes() == src.read_bytes()
    write_gguf(encoded, fresh(ours.metadata), tensor_data)  # the vocabulary encoded anew
    assert encoded.read_bytes() == src.read_bytes()


# --- bad input --------------------------------------------------------------------------------


def test_truncated_files_are_clear_errors(written, tmp_path):
    path, _ = written
    data = path.read_bytes()
    f = read_gguf(path)
    last = f.tensors[-1]
    cuts = [0, 3, 10, 30, 100, 300, f.data_offset - 1, last.offset + last.nbytes - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|empty|magic") as e:
            read_gguf(bad)
        assert str(bad) in str(e.value)


@pytest.mark.parametrize(("blob", "message"), [
    (b"GGML" + bytes(20), "magic"),
    (header(version=1), "version 1"),
    (header(version=2**24), "big-endian"),
    (header(n_kv=1, kvs=string(b"k") + struct.pack("<I", 99)), "not a GGUF value type"),
    (header(n_kv=2, kvs=(string(b"k") + struct.pack("<IB", 0, 1)) * 2), "duplicate metadata key"),
    (header(n_kv=1, kvs=string(b"general.alignment") + struct.pack("<II", 4, 48)), "power of two"),
    (header(n_tensors=1, infos=tensor_info(type_id=999)) + bytes(200), "unknown ggml type id 999"),
    (header(n_tensors=1, infos=tensor_info(dims=(1, 1, 1, 1, 1))), "5 dimensions"),
    (header(n_tensors=1, infos=tensor_info(dims=(48,), type_id=8)) + bytes(200), "block size"),
    (header(n_tensors=1, infos=tensor_info(offset=8)) + bytes(300),
     "not a multiple of the alignment"),
    (header(n_tensors=2, infos=tensor_info() + tensor_info()) + bytes(400),
     "duplicate tensor name"),
    (header(n_tensors=1, infos=tensor_info(dims=(2**40,))) + bytes(64), "truncated"),
    (header(n_kv=2**40), "cannot fit"),
    # A string array is checked when the file is read, though decoded only when used.
    (header(n_kv=1, kvs=string(b"k") + struct.pack("<IIQ", 9, 8, 2) + string(b"ab")
             + struct.pack("<Q", 50) + b"xy"), "the 2 strings of 'k' run past the end"),
    (header(n_kv=1, kvs=string(b"k") + struct.pack("<IIQ", 9, 8, 3) + string(b"ab") + b"\x01"),
     "the 3 strings of 'k' run past the end"),
])
def test_corrupt_files_are_clear_errors(tmp_path, blob, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(blob)
    with pytest.raises(ValueError, match=message):
        read_gguf(bad)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_gguf(tmp_path / "empty.gguf")
