"""GPTQ into GGUF on a Ray cluster (algorithms/solvers.RaySolver): a 2-CPU cluster on the
loopback address (conftest's ray_cluster) writes the very bytes the local run writes, with and
without an importance matrix, and ships what SolveStats says; (slow) the same on SmolLM2's first
blocks."""

import numpy as np
import pytest
import torch
from test_export import make_tiny_llama

from zeropoint.algorithms.solvers import LocalSolver, RaySolver


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """make_tiny_llama's checkpoint with 128-wide MLPs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_gptq_ray")
    make_tiny_llama(path)
    config = LlamaConfig.from_pretrained(path)
    config.intermediate_size = 128
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    return saved


def _gguf_bytes(tiny_checkpoint, out, target, solver=None, importance=None):
    from zeropoint.gguf.gptq import gptq_gguf
    from zeropoint.models.load import load_model

    loaded = load_model(tiny_checkpoint, progress=False)
    ids = torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(0))
    report = gptq_gguf(loaded, out, target, ids, importance=importance, solver=solver)
    assert report.gptq_tensors == 2 * 7
    return out.read_bytes()


def _importance(name):
    """A made-up importance matrix: positive, different for every tensor and column."""
    if not name.startswith("blk."):
        return None
    seed = sum(map(ord, name)) % 1000
    return np.random.default_rng(seed).uniform(0.1, 4.0, 128 if "ffn_down" in name else 64)


@pytest.mark.parametrize("target, weighted", [("Q4_0", False), ("Q4_K_M", True)])
def test_ray_cluster_writes_the_local_bytes(tiny_checkpoint, ray_cluster, tmp_path, target,
                                            weighted):
    importance = _importance if weighted else None
    local = LocalSolver()
    saved = _threads(2)
    try:
        want = _gguf_bytes(tiny_checkpoint, tmp_path / "local.gguf", target, local, importance)
        _threads(1)  # the driver's thread count changes nothing either
        with RaySolver(ray_cluster) as ray_solver:
            got = _gguf_bytes(tiny_checkpoint, tmp_path / "ray.gguf", target, ray_solver,
                              importance)
    finally:
        torch.set_num_threads(saved)
    assert got == want
    # 2 layers x 4 stages; every Linear a job; each stage's inverse Hessian sent once.
    assert ray_solver.stats.jobs == local.stats.jobs == 14
    assert ray_solver.stats.stages == 8
    # What was shipped: every weight (float32), and per stage one inverse Hessian (float32),
    # its act-order permutation (int64) and dead-column mask (bool). conftest's tiny Llama:
    # hidden 64, MLP 128, 4 heads of 16, 2 KV heads.
    weights = 4 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128)
    inverses = 3 * (4 * 64 * 64 + 9 * 64) + (4 * 128 * 128 + 9 * 128)
    assert ray_solver.stats.sent_bytes == 2 * (weights + inverses)
    assert ray_solver.stats.sent_bytes == local.stats.sent_bytes




def _gguf_in_a_task(checkpoint: str, out: str) -> tuple[bytes, int]:
    """Runs as a Ray task, as a sweep's make task does: its solver finds the task's cluster."""
    from pathlib import Path

    from zeropoint.algorithms.solvers import make_solver

    with make_solver("auto") as solver:
        assert isinstance(solver, RaySolver)
        data = _gguf_bytes(checkpoint, Path(out), "Q4_0", solver)
    return data, solver.stats.jobs


def test_a_ray_task_solves_its_layers_as_tasks_of_its_own(tiny_checkpoint, ray_cluster,
                                                          tmp_path):
    """A sweep's GPTQ make task on the cluster (2 CPUs: the task holds one while it waits for
    its solves, which Ray lets run on the other) writes the local bytes."""
    from zeropoint.algorithms.solvers import ray_session

    want = _gguf_bytes(tiny_checkpoint, tmp_path / "local.gguf", "Q4_0")
    with ray_session(ray_cluster) as ray:
        task = ray.remote(num_cpus=1, max_retries=0)(_gguf_in_a_task)
        got, jobs = ray.get(task.remote(str(tiny_checkpoint), str(tmp_path / "ray.gguf")))
    assert got == want and jobs == 14


@pytest.mark.slow
def test_smollm2_first_blocks_on_ray_are_the_local_bytes(ray_cluster, tmp_path):
    """SmolLM2's first 2 decoder blocks (576 wide, MLP 1536: Q4_K_M gives them Q5_0/Q4_0
    fallbacks, and Q6_K/Q4_K for ffn_down), GPTQ'd here and on the cluster."""
    import copy

    from zeropoint.algorithms.sequential import calibration_ids
    from zeropoint.calibrate.texts import default_calibration_text
    from zeropoint.gguf.gptq import gptq_gguf
    from zeropoint.models.load import load_model
    from zeropoint.models.source import default_model_path

    loaded = load_model(default_model_path(), progress=False)
    loaded.model.model.layers = loaded.model.model.layers[:2]
    ids = calibration_ids(loaded.tokenizer, default_calibration_text(), 2, 128)
    twin = copy.copy(loaded)
    twin.model = copy.deepcopy(loaded.model)
    gptq_gguf(loaded, tmp_path / "local.gguf", "Q4_K_M", ids, solver=LocalSolver())
    with RaySolver(ray_cluster) as solver:
        report = gptq_gguf(twin, tmp_path / "ray.gguf", "Q4_K_M", ids, solver=solver)
    assert report.gptq_tensors == 2 * 7 and solver.stats.jobs == 14
    assert (tmp_path / "ray.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


def test_quantize_command_with_ray_writes_the_same_file(tiny_checkpoint, ray_cluster, tmp_path):
    from zeropoint.cli import main

    def quantize(out, *extra):
        return main(["quantize", str(tiny_checkpoint), "--type", "Q4_0", "--method", "gptq",
                     "--calib-tokens", "512", "-o", str(out), "--quiet", *extra])

    assert quantize(tmp_path / "local.gguf") == 0
    assert quantize(tmp_path / "ray.gguf", "--ray", ray_cluster) == 0
    assert (tmp_path / "ray.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


def test_quantize_ray_needs_gptq(tiny_checkpoint, tmp_path, capsys):
    from zeropoint.cli import main

    assert main(["quantize", str(tiny_checkpoint), "--type", "Q4_0", "--ray", "local", "-o",
                 str(tmp_path / "x.gguf")]) == 2
    assert "--ray runs GPTQ's per-layer solves" in capsys.readouterr().err
