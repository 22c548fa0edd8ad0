"""GGUF files out (zeropoint.gguf.writer), read back by gguf-py's GGUFReader and by ours."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as V
from gguf_samples import METADATA, fresh, tensor_bytes, write_sample

from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.reader import read_gguf
from zeropoint.gguf.writer import TensorData, write_gguf


@pytest.fixture
def written(tmp_path, gen):
    return write_sample(tmp_path, gen)


def test_write_then_gguf_reader_reads_every_value_and_tensor(written):
    path, tensors = written
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(METADATA)  # same keys, same order
    for key, meta in METADATA.items():
        f = fields[key]
        assert f.types[0] == meta.type, key
        if meta.type == V.ARRAY:
            assert f.types[-1] == meta.sub_type, key
        got = f.contents()
        if meta.type == V.FLOAT32 or meta.sub_type == V.FLOAT32:
            assert np.allclose(got, meta.value), key
        else:
            assert got == meta.value, key
    assert reader.alignment == 64 and reader.data_offset % 64 == 0
    assert [t.name for t in reader.tensors] == [t.name for t in tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert theirs.tensor_type.name == ours.type
        assert tuple(reversed(theirs.shape.tolist())) == ours.shape
        assert theirs.data_offset % 64 == 0
        assert np.asarray(theirs.data).tobytes() == tensor_bytes(ours.data), ours.name


def test_rewriting_what_was_read_gives_the_same_file(written, tmp_path):
    path, _ = written
    f = read_gguf(path)
    copy = tmp_path / "copy.gguf"
    write_gguf(copy, f.metadata, [TensorData(t.name, t.type, t.shape, f.raw(t)) for t in f.tensors])
    assert copy.read_bytes() == path.read_bytes()


def test_read_values_are_copied_as_a_fresh_encoding_would_write_them(written, tmp_path):
    path, tensors = written
    f = read_gguf(path)
    assert f.metadata == METADATA and METADATA == f.metadata  # equal across both classes
    tensor_data = [TensorData(t.name, t.type, t.shape, f.raw(t)) for t in f.tensors]
    copied, encoded = tmp_path / "copied.gguf", tmp_path / "encoded.gguf"
    write_gguf(copied, read_gguf(path).metadata, tensor_data)  # string arrays never decoded
    write_gguf(encoded, fresh(f.metadata), tensor_data)
    assert copied.read_bytes() == encoded.read_bytes() == path.read_bytes()


def test_files_are_the_same_where_fallocate_is_missing(written, tmp_path, monkeypatch):
    from zeropoint.gguf import writer

    path, tensors = written
    monkeypatch.setattr(writer, "_fallocate", None)  # ftruncate alone: padding must still be zeros
    again = tmp_path / "again.gguf"
    write_gguf(again, METADATA, tensors)
    assert again.read_bytes() == path.read_bytes()


def test_default_alignment_empty_array_and_non_utf8_string(tmp_path):
    meta = {"a.empty": MetaValue.array([], V.INT32), "a.bytes": MetaValue(b"\xff\xfe", V.STRING),
            "a.str_bytes": MetaValue.array([b"\xc3", "ok"], V.STRING)}
    path = tmp_path / "e.gguf"
    write_gguf(path, meta, [TensorData("x", "F32", (3,), np.arange(3, dtype=np.float32))])
    f = read_gguf(path)
    assert f.alignment == 32 and f.data_offset % 32 == 0
    assert f.metadata["a.empty"] == MetaValue([], V.ARRAY, V.INT32)
    assert f.get("a.bytes") == b"\xff\xfe" and f.get("a.str_bytes") == [b"\xc3", "ok"]
    assert gguf.GGUFReader(path).tensors[0].data.tolist() == [0.0, 1.0, 2.0]


def test_a_failed_write_leaves_nothing_behind_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.gguf"
    path.write_bytes(b"old")

    def boom():
        raise RuntimeError("quantizer failed")

    tensors = [TensorData("a", "F32", (4,), np.zeros(4, np.float32)),
               TensorData("b", "F32", (4,), boom)]
    with pytest.raises(RuntimeError, match="quantizer failed"):
        write_gguf(path, {}, tensors)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


@pytest.mark.parametrize(("tensors", "message"), [
    ([TensorData("a", "F32", (4,), np.zeros(3, np.float32))], "needs 16 bytes, got 12"),
    ([TensorData("a", "Q4_0", (4, 48), np.zeros(1, np.uint8))], "multiple of 32"),
    ([TensorData("a", "Q9_9", (32,), b"")], "unknown ggml type 'Q9_9'"),
    ([TensorData("a", "F32", (1,), b"\0" * 4)] * 2, "duplicate tensor name"),
    ([TensorData("a", "F32", (1, 1, 1, 1, 1), b"\0" * 4)], "1..4 dims"),
])
def test_bad_tensors_are_rejected_before_or_while_writing(tmp_path, tensors, message):
    with pytest.raises(ValueError, match=message):
        write_gguf(tmp_path / "x.gguf", {}, tensors)
    assert not list(tmp_path.iterdir())


def test_bad_alignment_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="power of two"):
        write_gguf(tmp_path / "x.gguf", {"general.alignment": MetaValue.u32(24)}, [])
