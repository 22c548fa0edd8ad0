"""How the C kernels are built and run: on torch's own OpenMP runtime, whatever else is loaded."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zeropoint import ckernels

# A second libgomp loaded first (sentencepiece ships one) must not decide the build: the kernels
# still link against torch's, load no runtime of their own, and split their work.
PROBE = """
import sentencepiece, torch
def gomps():
    return {l.split()[-1] for l in open("/proc/self/maps") if "/libgomp" in l}
before = gomps()
from zeropoint import ckernels
lib = ckernels.library()
print(lib.zp_openmp(), len(before), len(gomps() - before))
"""


def torch_libgomp() -> bool:
    root = Path(torch.__file__).resolve().parent
    return any(p.name.startswith("libgomp") for d in (root / "lib", root.parent / "torch.libs")
               if d.is_dir() for p in d.iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_kernels_run_on_torchs_openmp_even_beside_another_libgomp():
    pytest.importorskip("sentencepiece")
    if ckernels.library() is None or not torch_libgomp():
        pytest.skip("no C kernels, or a torch without its own libgomp")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    openmp, runtimes_before, runtimes_added = map(int, out[-3:])
    assert runtimes_before == 2  # torch's and sentencepiece's: the case under test
    assert openmp == 1
    assert runtimes_added == 0
