from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from zeropoint.threads import torch_threads


def test_the_count_is_set_inside_and_restored_after():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_restored_when_the_block_raises():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_without_torch_loaded_nothing_is_imported():
    code = ("import sys; from zeropoint.threads import torch_threads\n"
            "with torch_threads(1): pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
