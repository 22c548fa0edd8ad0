"""llama.cpp's imatrix files (zeropoint.gguf.imatrix): GGUF checked with gguf-py's reader, the
legacy .dat layout with an encoder written here from imatrix.cpp's description, both round trips,
and bad files."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from zeropoint.gguf.imatrix import (
    ImportanceMatrix,
    InvalidImatrixError,
    dat_bytes,
    read_imatrix,
    write_imatrix,
)


@pytest.fixture
def imat():
    rng = np.random.default_rng(7)
    sums = {
        "blk.0.attn_q.weight": (rng.random(64) * 100).astype(np.float32),
        "blk.0.ffn_down.weight": (rng.random(96) * 3).astype(np.float32),
        "blk.1.ffn_gate_exps.weight": (rng.random((4, 32)) * 50).astype(np.float32),
        "output.weight": (rng.random(64) * 7).astype(np.float32),
    }
    counts = {
        "blk.0.attn_q.weight": [1024], "blk.0.ffn_down.weight": [1024],
        "blk.1.ffn_gate_exps.weight": [700, 0, 1324, 24], "output.weight": [1024],
    }
    return ImportanceMatrix(sums, counts, ["calib.txt"], chunk_count=4, chunk_size=256)


def test_gguf_py_reads_what_we_write(tmp_path, imat):
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, imat)
    r = gguf.GGUFReader(path)
    fields = {k: r.fields[k].contents() for k in r.fields if not k.startswith("GGUF.")}
    assert fields == {"general.type": "imatrix", "imatrix.datasets": ["calib.txt"],
                      "imatrix.chunk_count": 4, "imatrix.chunk_size": 256}
    tensors = {t.name: t for t in r.tensors}
    expected_names = [n + s for n in sorted(imat.sums) for s in (".in_sum2", ".counts")]
    assert [t.name for t in r.tensors] == expected_names
    for name, sums in imat.sums.items():
        s, c = tensors[name + ".in_sum2"], tensors[name + ".counts"]
        n_mat = len(imat.counts[name])
        assert s.tensor_type == c.tensor_type == gguf.GGMLQuantizationType.F32
        # ggml's ne order, trailing 1s dropped, as gguf_write_to_file writes them
        assert list(s.shape) == ([sums.shape[-1]] if n_mat == 1 else [sums.shape[-1], n_mat])
        assert list(c.shape) == ([1] if n_mat == 1 else [1, n_mat])
        assert np.array_equal(np.asarray(s.data).reshape(-1), sums.reshape(-1))
        assert np.array_equal(np.asarray(c.data).reshape(-1),
                              np.asarray(imat.counts[name], dtype=np.float32))


def test_gguf_round_trip(tmp_path, imat):
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, imat)
    back = read_imatrix(path)
    assert back.names() == imat.names()
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 4, 256)
    for name in imat.names():
        assert back.sums[name].shape == imat.sums[name].shape
        assert np.array_equal(back.sums[name], imat.sums[name])
        assert np.array_equal(back.counts[name], imat.counts[name])


def test_importance_is_what_llama_quantize_passes(imat):
    # quantize.cpp: per matrix (expert), sum / (float) count in float32; no tokens -> all ones.
    for name in imat.names():
        sums, counts = imat.sums[name], imat.counts[name]
        rows = sums.reshape(len(counts), -1)
        expected = np.empty_like(rows)
        for e, count in enumerate(counts):
            for j in range(rows.shape[1]):
                expected[e, j] = (np.float32(rows[e, j]) / np.float32(count) if count
                                  else np.float32(1))
        got = imat.importance(name)
        assert got.dtype == np.float32 and got.shape == sums.shape
        assert np.array_equal(got, expected.reshape(sums.shape))
    assert imat.importance("blk.9.attn_q.weight") is None


def _legacy_encoder(entries, chunk_count, dataset):
    """imatrix.cpp's save_imatrix_legacy, described: entries (name, ncall, float values)."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name.encode()
        out += struct.pack("<ii", ncall, len(values)) + struct.pack(f"<{len(values)}f", *values)
    return out + struct.pack("<ii", chunk_count, len(dataset)) + dataset.encode()


def test_dat_bytes_follow_the_legacy_layout(imat):
    entries = []
    for name in sorted(imat.sums):
        counts = imat.counts[name]
        ncall = -(-max(counts) // 256)
        rows = imat.sums[name].reshape(len(counts), -1)
        values = [float((np.float32(v) / np.float32(c)) * np.float32(ncall)) if c
                  else float(ncall)  # an unseen expert stores 1 * ncall
                  for c, row in zip(counts, rows) for v in row]
        entries.append((name, ncall, values))
    assert dat_bytes(imat) == _legacy_encoder(entries, 4, "calib.txt")


def test_dat_round_trip_and_importance(tmp_path, imat):
    path = tmp_path / "imatrix.dat"
    write_imatrix(path, imat)  # the suffix chooses the legacy format
    back = read_imatrix(path)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 4, 0)
    for name in imat.names():
        # a legacy file keeps means: they agree to float32 rounding of (s / c * n) / n
        np.testing.assert_allclose(back.importance(name), imat.importance(name).reshape(-1),
                                   rtol=3e-7)
        assert back.importance(name).shape == (imat.sums[name].size,)
    again = tmp_path / "again.dat"
    write_imatrix(again, back)
    assert again.read_bytes() == path.read_bytes()
    # .dat -> GGUF -> .dat keeps the bytes too
    write_imatrix(tmp_path / "via.gguf", back)
    write_imatrix(tmp_path / "via.dat", read_imatrix(tmp_path / "via.gguf"), format="dat")
    assert (tmp_path / "via.dat").read_bytes() == path.read_bytes()


def test_entries_without_tokens_are_left_out_of_dat(imat):
    imat.counts["output.weight"][:] = 0
    names = []
    data, at = dat_bytes(imat), 4
    for _ in range(struct.unpack_from("<i", data)[0]):
        (n,) = struct.unpack_from("<i", data, at)
        names.append(data[at + 4: at + 4 + n].decode())
        (nval,) = struct.unpack_from("<i", data, at + 8 + n)
        at += 12 + n + 4 * nval
    assert "output.weight" not in names and len(names) == 3


def test_legacy_file_without_trailer(tmp_path):
    path = tmp_path / "old.dat"
    path.write_bytes(_legacy_encoder([("blk.0.attn_k.weight", 10, [20.0, 40.0])], 0, "")[:-8])
    back = read_imatrix(path)
    assert back.chunk_count == 0 and back.datasets == []
    assert np.array_equal(back.importance("blk.0.attn_k.weight"), np.float32([2.0, 4.0]))


@pytest.mark.parametrize("cut", [2, 6, 20, 31])
def test_truncated_dat_is_an_error(tmp_path, cut):
    path = tmp_path / "bad.dat"
    path.write_bytes(_legacy_encoder([("blk.0.attn_k.weight", 10, [1.0, 2.0, 3.0])], 1, "x")[:cut])
    with pytest.raises(InvalidImatrixError, match="truncated|ends inside"):
        read_imatrix(path)


def test_not_an_imatrix(tmp_path):
    path = tmp_path / "zero.dat"
    path.write_bytes(struct.pack("<i", 0))
    with pytest.raises(InvalidImatrixError, match="entry count"):
        read_imatrix(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_imatrix(tmp_path / "missing.gguf")


def test_gguf_without_metadata_or_counts(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "model.gguf", arch="llama")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(8, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(InvalidImatrixError, match="without the imatrix metadata"):
        read_imatrix(tmp_path / "model.gguf")
    w = gguf.GGUFWriter(tmp_path / "half.gguf", arch="")
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        w.add_uint32(key, 1)
    w.add_array("imatrix.datasets", ["x"])
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(8, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(InvalidImatrixError, match="has sums but not counts"):
        read_imatrix(tmp_path / "half.gguf")


def test_bad_values():
    with pytest.raises(ValueError, match="one count per matrix"):
        ImportanceMatrix({"a": np.ones((2, 4), np.float32)}, {"a": [1]})
    with pytest.raises(ValueError, match="only in one"):
        ImportanceMatrix({"a": np.ones(4, np.float32)}, {})
    with pytest.raises(ValueError, match="format must be one of gguf, dat"):
        write_imatrix("x.bin", ImportanceMatrix({"a": np.ones(4)}, {"a": [1]}), format="npz")
