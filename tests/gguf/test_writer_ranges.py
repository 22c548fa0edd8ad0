"""Tensors copied from another file (writer.FileRange): by the kernel, a run of ranges that lie
in their source as they will in the output in one copy; read back by gguf-py, every tensor is
its source's bytes and the padding is zeros even where the source's padding is not. Where the
kernel cannot copy (copy_file_range refused: EXDEV, ENOSYS, ...) the file is the same; any other
failure is raised and leaves no file behind."""
from __future__ import annotations

import errno
import os

import gguf
import numpy as np
import pytest

from zeropoint.gguf import writer
from zeropoint.gguf.writer import FileRange, TensorData, write_gguf

ALIGN = 32  # the default alignment: the sizes below leave padding after most tensors


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@pytest.fixture
def source(tmp_path):
    """A file of random bytes: whatever lies between the ranges is garbage, not zeros."""
    path = tmp_path / "source.bin"
    path.write_bytes(np.random.default_rng(18).integers(0, 256, 1 << 16, np.uint8).tobytes())
    return path


def _tensors(source) -> list[TensorData]:
    """Three ranges laid out in the source as in the output (one run, garbage in its gaps), a
    tensor made here, a range elsewhere (its own copy), one more run of two, then two ranges
    as far apart in the source as in the output with a tensor made here between them (not one
    run: copied as one, they would overwrite it)."""
    counts = [13, 8, 100, 5, 7, 64, 3, 9, 30, 11]  # float32 values: 52, 32, 400, ... bytes
    out_at, at = [], 0  # each tensor's offset in the output's data section
    for n in counts:
        out_at.append(at)
        at += _padded(4 * n)
    base = 1000  # the run's first byte in the source; output offsets keep their distances
    src_at = [base + out_at[0], base + out_at[1], base + out_at[2], None, 40_001,
              20_000, 20_000 + out_at[6] - out_at[5], 30_000, None,
              30_000 + out_at[9] - out_at[7]]
    return [TensorData(f"t{i}", "F32", (n,),
                       np.arange(n, dtype=np.float32) + i if src_at[i] is None
                       else FileRange(source, src_at[i], 4 * n))
            for i, n in enumerate(counts)]


def _check_against_source(path, source, tensors):
    src = source.read_bytes()
    reader = gguf.GGUFReader(path)
    out = path.read_bytes()
    ends = []
    for t, info in zip(tensors, reader.tensors, strict=True):
        assert info.name == t.name
        got = out[info.data_offset:info.data_offset + t.nbytes]
        if isinstance(t.data, FileRange):
            want = src[t.data.offset:t.data.offset + t.data.nbytes]
        else:
            want = t.data.tobytes()
        assert got == want, t.name
        ends.append((info.data_offset + t.nbytes, info.data_offset))
    starts = [s for _, s in ends[1:]] + [len(out)]
    for (end, _), next_start in zip(ends, starts):
        assert next_start - end < ALIGN and out[end:next_start] == bytes(next_start - end)


@pytest.mark.parametrize("threads", [1, 2])  # 2: tensors made on the pool, copies meanwhile
def test_ranges_are_their_sources_bytes_and_padding_is_zeros(tmp_path, source, threads):
    tensors = _tensors(source)
    out = tmp_path / "out.gguf"
    write_gguf(out, {}, tensors, threads=threads)
    _check_against_source(out, source, tensors)


def test_a_tensor_between_two_ranges_is_not_copied_over(tmp_path, source):
    # The two ranges lie as far apart in the source as in the output, but the output holds
    # another tensor between them: each is copied alone, and the bytes between stay as they are.
    out = tmp_path / "out.bin"
    out.write_bytes(b"\xee" * 256)
    fd = os.open(out, os.O_WRONLY)
    try:
        writer._copy_ranges(fd, [(FileRange(source, 1000, 32), 0, 0),
                                 (FileRange(source, 1000 + 96, 32), 96, 2)])
    finally:
        os.close(fd)
    src, got = source.read_bytes(), out.read_bytes()
    assert got[:32] == src[1000:1032] and got[96:128] == src[1096:1128]
    assert got[32:96] == b"\xee" * 64 and got[128:] == b"\xee" * 128


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP])
def test_where_the_kernel_cannot_copy_the_file_is_the_same(tmp_path, source, monkeypatch, code):
    tensors = _tensors(source)
    write_gguf(tmp_path / "kernel.gguf", {}, tensors)
    calls = []

    def refused(*args):
        calls.append(args)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", refused)
    write_gguf(tmp_path / "buffered.gguf", {}, tensors)
    assert calls  # the kernel was asked first
    assert (tmp_path / "buffered.gguf").read_bytes() == (tmp_path / "kernel.gguf").read_bytes()


def test_where_copy_file_range_is_missing_the_file_is_the_same(tmp_path, source, monkeypatch):
    tensors = _tensors(source)
    write_gguf(tmp_path / "kernel.gguf", {}, tensors)
    monkeypatch.delattr(os, "copy_file_range")
    write_gguf(tmp_path / "buffered.gguf", {}, tensors)
    assert (tmp_path / "buffered.gguf").read_bytes() == (tmp_path / "kernel.gguf").read_bytes()


def test_a_copy_that_fails_otherwise_is_raised_and_leaves_no_file(tmp_path, source,
                                                                  monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    out_dir = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        write_gguf(out_dir / "x.gguf", {}, _tensors(source))
    assert caught.value.errno == errno.ENOSPC
    assert not list(out_dir.iterdir())


def test_a_range_past_the_sources_end_is_a_clear_error(tmp_path, source):
    size = source.stat().st_size
    tensors = [TensorData("a", "F32", (16,), FileRange(source, size - 32, 64))]
    with pytest.raises(ValueError, match=r"source\.bin' ends before byte"):
        write_gguf(tmp_path / "x.gguf", {}, tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["source.bin"]


def test_a_range_of_the_wrong_size_is_refused(tmp_path, source):
    tensors = [TensorData("a", "F32", (16,), FileRange(source, 0, 60))]
    with pytest.raises(ValueError, match="needs 64 bytes, its source range has 60"):
        write_gguf(tmp_path / "x.gguf", {}, tensors)
