"""torch's intra-op thread count for the length of a block, for code that must not depend on it
(GPTQ's Cholesky: its bits change with the thread count) or must not start a team of its own
(work already spread over threads or processes). torch is not imported here: where no one has
loaded it, there is nothing to set, and the GGUF requantizer stays torch-free."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) inside the block, the count before restored after it."""
    torch = sys.modules.get("torch")
    saved = torch.get_num_threads() if torch is not None else n
    if saved != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if saved != n:
            torch.set_num_threads(saved)
