import os

# Spinning OpenMP workers (torch's and llama.cpp's) starve each other on 2 shared cores; passive
# waiting must be set before torch loads, which is why it is here at the top.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests are deterministic and do not race the 2-core machine against itself.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
