"""Where the GPTQ solves of one decoder layer run: here, one after another (LocalSolver), or as
parallel tasks on a Ray cluster (RaySolver). The layers stay in sequence either way (each layer's
inputs are the previous layer's quantized outputs, computed here); what runs in parallel is the
Linears of one stage of a layer (q, k and v; gate and up), each its own task.

A SolveJob is one Linear's GPTQ as a pure function of its weight and the inverse Hessian of its
input (algorithms/gptq.InverseHessian, computed once per input and shared by the Linears that
read it), so a task computes exactly what the local loop computes: the codes are the same bytes
(tests/algorithms/test_solvers.py). The function must be a module-level one (a Ray worker imports
it by name) and its arguments plain data (tensors, numpy arrays, dataclasses).

What a task costs to send: its weight (out x in float32) and, once per input and node, the
inverse Hessian (in x in float32) through Ray's object store; what comes back is the Linear's
codes (its ggml bytes, or a QTensor's codes and scales). SolveStats counts both.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .gptq import InverseHessian


@dataclass
class SolveJob:
    """One Linear's GPTQ: `fn(weight, inverse, *args)` runs wherever the solver puts it; its
    result goes to `apply`, which runs here, in job order, and writes it into the model."""

    name: str  # the Linear's name, for reports
    fn: Callable  # module-level: a Ray worker imports it by name
    weight: torch.Tensor  # (out, in)
    inverse: InverseHessian  # shared by the jobs of Linears that read one input
    args: tuple = ()
    apply: Callable[[object], None] = field(default=lambda result: None, repr=False)


@dataclass
class SolveStats:
    """What a solver did: jobs run, stages (parallel rounds), bytes shipped each way, time."""

    jobs: int = 0
    stages: int = 0
    sent_bytes: int = 0  # weights, and each stage's inverse Hessians once
    returned_bytes: int = 0  # the results
    seconds: float = 0.0  # wall time inside run(), shipping and waiting included


class LocalSolver:
    """Every job in this process, one after another, on torch's threads."""

    def __init__(self):
        self.stats = SolveStats()

    def __enter__(self) -> LocalSolver:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, jobs: Sequence[SolveJob]) -> list:
        started = time.perf_counter()
        results = [job.fn(job.weight, job.inverse, *job.args) for job in jobs]
        _count(self.stats, jobs, results, started)
        return results


class RaySolver:
    """Each job a Ray task of `cpus` CPUs (Ray gives the task that many torch threads), the
    jobs of a stage all in flight at once. Use as a context manager, which connects to the
    cluster at `address` ('HOST:PORT', 'auto', or 'local' for a new one on this machine) unless
    this process is already connected (as a sweep's Ray task is), and disconnects after."""

    def __init__(self, address: str = "auto", cpus: int = 1):
        if cpus < 1:
            raise ValueError(f"cpus per solve task must be at least 1, got {cpus}")
        self.address, self.cpus = address, cpus
        self.stats = SolveStats()
        self._session = None
        self._remote = None

    def __enter__(self) -> RaySolver:
        self._session = ray_session(self.address)
        ray = self._session.__enter__()
        self._remote = ray.remote(num_cpus=self.cpus, max_retries=0)(_call)
        return self

    def __exit__(self, *exc) -> None:
        session, self._session, self._remote = self._session, None, None
        session.__exit__(*exc)

    def run(self, jobs: Sequence[SolveJob]) -> list:
        import ray

        if self._remote is None:
            raise RuntimeError("RaySolver.run outside its `with` block: not connected")
        started = time.perf_counter()
        inverses: dict[int, object] = {}  # id(inverse) -> its object ref, put once per stage
        refs = []
        for job in jobs:
            key = id(job.inverse)
            if key not in inverses:
                inverses[key] = ray.put(job.inverse)
            refs.append(self._remote.remote(job.fn, ray.put(job.weight), inverses[key],
                                            *job.args))
        results = ray.get(refs)
        _count(self.stats, jobs, results, started)
        return results


def run_jobs(solver, jobs: Sequence[SolveJob]) -> None:
    """The jobs' results from `solver` (None: LocalSolver), applied in job order."""
    if not jobs:
        return
    results = (solver or LocalSolver()).run(jobs)
    for job, result in zip(jobs, results, strict=True):
        job.apply(result)


def make_solver(ray_address: str | None, cpus: int = 1):
    """A LocalSolver, or a RaySolver for `ray_address`; either one a context manager. Raises
    ImportError saying how to install Ray when it is missing."""
    if ray_address is None:
        return LocalSolver()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ImportError("--ray needs Ray: pip install 'zeropoint[ray]'") from None
    return RaySolver(ray_address, cpus)


@contextmanager
def ray_session(address: str) -> Iterator:
    """The `ray` module, connected: to the cluster at `address` ('HOST:PORT', 'auto'), or to a
    new one on this machine for 'local', disconnected (and a local one stopped) on leaving. A
    process already connected (a Ray task, or a caller's own ray.init) stays as it is."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address == "local":  # a new cluster even where another one runs on this machine
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **options)
    else:
        ray.init(address=address, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def _call(fn, weight, inverse, *args):
    """A Ray task's body: the job's function on its (already fetched) weight and inverse."""
    return fn(weight, inverse, *args)


def _count(stats: SolveStats, jobs, results, started: float) -> None:
    stats.jobs += len(jobs)
    stats.stages += 1
    stats.sent_bytes += sum(_nbytes(j.weight) for j in jobs) + \
        sum(j.inverse.nbytes for j in {id(j.inverse): j for j in jobs}.values())
    stats.returned_bytes += sum(_nbytes(r) for r in results)
    stats.seconds += time.perf_counter() - started


def _nbytes(x) -> int:
    """Bytes of the tensors and arrays in `x` (a tensor, array, dataclass or tuple of them)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if hasattr(x, "nbytes") and not isinstance(x, type):
        return int(x.nbytes)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return sum(_nbytes(getattr(x, f.name)) for f in dataclasses.fields(x))
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0
