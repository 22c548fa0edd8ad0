"""csrc/gguf_scan.c's walk over a header's string arrays agrees with header.py's Python walk,
which is the oracle here: on whole arrays, and on every truncation of one."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from zeropoint import ckernels
from zeropoint.gguf.header import HeaderParser

pytestmark = pytest.mark.skipif(ckernels.library() is None, reason="needs the C kernels")


def strings_blob(n: int, seed: int = 3) -> bytes:
    rng = np.random.default_rng(seed)
    return b"".join(struct.pack("<Q", k) + bytes(rng.integers(0, 256, k, dtype=np.uint8))
                    for k in rng.integers(0, 40, n))


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_c_walk_matches_python_walk(n):
    blob = b"xyz" + strings_blob(n) + b"tail"
    p = HeaderParser(memoryview(blob), "test")
    p.pos = 3
    assert p._skip_strings_c(n) == p._skip_strings_py(n) == len(blob) - 4


def refused(pos: int, size: int) -> bool:
    return pos < 0 or pos > size  # skip_strings fails on either


def test_truncated_arrays_are_refused_by_both_walks():
    blob = strings_blob(300)
    for cut in range(0, len(blob), 7):
        p = HeaderParser(memoryview(blob[:cut]), "test")
        assert refused(p._skip_strings_c(300), cut) and refused(p._skip_strings_py(300), cut)
    huge = struct.pack("<Q", 2**63 + 5) + b"abc"  # a length past any offset
    p = HeaderParser(memoryview(huge), "test")
    assert refused(p._skip_strings_c(1), len(huge)) and refused(p._skip_strings_py(1), len(huge))
