"""Bytes from one file into another at given offsets, moved by the kernel (copy_file_range)
where it can, else through a buffer here. The one home of that fallback: the GGUF writer copies
the tensors that keep their type with it, the zeropoint-directory writer its spooled data."""

from __future__ import annotations

import errno
import os

CHUNK = 8 << 20  # bytes per read and write where the kernel cannot copy

# What copy_file_range answers where it cannot copy between these files (across file systems
# before Linux 5.3 and again after 5.18, a file system or kernel without it, a seccomp filter
# that refuses it): the copy goes on through a buffer. Anything else (a full disk, an I/O error)
# is the copy's failure, not the call's, and is raised.
UNSUPPORTED = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                         errno.ENOTSUP, errno.EPERM})


def copy_range(src_fd: int, dst_fd: int, nbytes: int, src_at: int, dst_at: int) -> None:
    """Copy `nbytes` at offset `src_at` of `src_fd` to offset `dst_at` of `dst_fd` (file
    offsets untouched). EOFError where the source ends first."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_at + done,
                                       dst_at + done)
                if n == 0:
                    raise EOFError(f"the source ends {nbytes - done} bytes short, at byte "
                                   f"{src_at + done}")
                done += n
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
    while done < nbytes:
        piece = os.pread(src_fd, min(CHUNK, nbytes - done), src_at + done)
        if not piece:
            raise EOFError(f"the source ends {nbytes - done} bytes short, at byte "
                           f"{src_at + done}")
        done += pwrite_all(dst_fd, piece, dst_at + done)


def pwrite_all(fd: int, data, at: int) -> int:
    """os.pwrite until all of `data` (contiguous bytes: bytes, a numpy array, a memoryview) is
    written at offset `at` (one call may write less); returns its size."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], at + done)
    return len(view)
