"""Where a sweep's tasks run: a bounded local process pool, or a Ray cluster. Both take the same
small graph (a task is a function and its arguments, some of them earlier tasks' results)
and return every task's result; the task functions are the same, so are the files."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context


@dataclass(frozen=True)
class Result:
    """In a Task's args: stands for the result of the earlier task of this name."""

    task: str


@dataclass(frozen=True)
class Task:
    name: str  # unique within the graph, e.g. "make Q4_0-rtn"
    fn: Callable
    args: tuple  # plain values, and Result(name) for what an earlier task returns
    cpus: int = 1  # threads the task uses

    @property
    def after(self) -> list[str]:
        return [a.task for a in self.args if isinstance(a, Result)]

    def bind(self, results: Mapping) -> tuple:
        return tuple(results[a.task] if isinstance(a, Result) else a for a in self.args)


@dataclass
class LocalPool:
    """At most `jobs` tasks at once, each in a worker process (spawned: a forked torch or
    llama.cpp would inherit threads that no longer exist)."""

    jobs: int
    on_done: Callable[[Task, object], None] = field(default=lambda task, result: None)

    def run(self, tasks: Sequence[Task]) -> dict[str, object]:
        _check_graph(tasks)
        results: dict[str, object] = {}
        waiting = list(tasks)
        running = {}
        with ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn")) as pool:
            while waiting or running:
                for task in [t for t in waiting if all(d in results for d in t.after)]:
                    waiting.remove(task)
                    running[pool.submit(task.fn, *task.bind(results))] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    results[task.name] = future.result()  # a failed task stops the sweep
                    self.on_done(task, results[task.name])
        return results


@dataclass
class RayCluster:
    """Each task a Ray task with `cpus` CPUs; dependencies passed as object references, which
    Ray resolves before the task starts. `address` is a cluster's ('HOST:PORT', 'auto') or
    'local' for a new one on this machine."""

    address: str
    on_done: Callable[[Task, object], None] = field(default=lambda task, result: None)

    def run(self, tasks: Sequence[Task]) -> dict[str, object]:
        from ..algorithms.solvers import ray_session

        _check_graph(tasks)
        with ray_session(self.address) as ray:
            refs = {}
            for task in tasks:
                remote = ray.remote(num_cpus=task.cpus, max_retries=0)(task.fn)
                refs[task.name] = remote.remote(*task.bind(refs))
            by_ref = {ref: name for name, ref in refs.items()}
            results: dict[str, object] = {}
            pending = list(refs.values())
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                name = by_ref[done[0]]
                results[name] = ray.get(done[0])
                self.on_done(next(t for t in tasks if t.name == name), results[name])
            return results


def _check_graph(tasks: Sequence[Task]) -> None:
    """Names unique, dependencies earlier in the list (so the graph has no cycle)."""
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise ValueError(f"two sweep tasks are named {task.name!r}")
        missing = [d for d in task.after if d not in seen]
        if missing:
            raise ValueError(f"task {task.name!r} depends on {missing}, which do not come before it")
        seen.add(task.name)


def ray_executor(address: str, on_done) -> RayCluster:
    """A RayCluster, or ImportError saying how to install Ray."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ImportError("--ray needs Ray: pip install 'zeropoint[ray]'") from None
    return RayCluster(address, on_done)
