import os

import pytest
import torch

# Tests are deterministic and do not race the 2-core machine against itself.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
