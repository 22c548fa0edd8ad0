"""A sweep's cost on paper: unit costs measured here, projected onto Llama-2-7B and -70B shapes.

Measures (this machine; medians of --runs):
- make, per weight: RTN (the C codecs) and HQQ into each --types type, on a 4096 x 4096 float32
  matrix (seconds per weight);
- GPTQ per Linear against matrix shape: the Hessian (tokens x in^2), its inverse (in^3, one
  thread), the column loop (out x in^2), fitted as c * size;
- scoring under llama.cpp, per token per parameter (SmolLM2-135M, eval --kld's forward);
- with --ray, the Ray GPTQ overhead: SmolLM2's first 2 blocks GPTQ'd here and on a local Ray
  cluster (RaySolver), alternated.

Projection of a 20-variant sweep (7 types x rtn/hqq/gptq, less one gptq):
  make(rtn|hqq) = P x c_type;  make(gptq) = sum over Linears of (T_cal in^2 c_H + in^3 c_inv
  [once per shared input] + out in c_col + out in^2 c_mm) + 1.3 T_cal P c_fwd (the forwards);
  score = T_score x P x c_tok (+ the reference once);  on N nodes: total / N (variants and a
  GPTQ layer's Linears are independent tasks), at least the longest GPTQ variant's critical path
  (its layers in sequence, each layer's largest stage on one node).
A node is this machine: 2 cores. Memory per node: the largest Linear's weight (float32, twice:
weights and codes) + its Hessian and inverse (in^2 float32 each) + the calibration activations of
one layer (T_cal x hidden float32, twice).

    python benchmarks/sweep_cost_model.py [--runs 3] [--ray]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# (name, hidden, intermediate, layers, kv heads x head dim, vocab)
MODELS = {"Llama-2-7B": (4096, 11008, 32, 4096, 32000),
          "Llama-2-70B": (8192, 28672, 80, 1024, 32000)}
T_CAL, T_SCORE = 16384, 4096  # the sweep's GPTQ calibration and scored tokens (its defaults)


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_costs(runs: int) -> dict[str, dict[str, float]]:
    from zeropoint.gguf.codecs import quantize_rows
    from zeropoint.gguf.hqq import hqq_encode

    x = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32) * 0.02
    xt = torch.from_numpy(x[:256])  # HQQ is slower: a slice, scaled
    costs: dict[str, dict[str, float]] = {"rtn": {}, "hqq": {}}
    for t in TYPES:
        costs["rtn"][t] = median_time(lambda: quantize_rows(x, t), runs) / x.size
        costs["hqq"][t] = median_time(lambda: hqq_encode(xt, t), max(1, runs - 1)) / xt.numel()
    return costs


def gptq_costs(runs: int) -> dict[str, float]:
    """c_H (s per token x in^2), c_inv (s per in^3, one thread), and the column loop's two
    terms: c_col (s per out x in: each column's rounding and rank-1 update) and c_mm (s per
    out x in^2: the lazy block updates), solved from two widths at out = 1024."""
    from zeropoint.algorithms.gptq import (
        GPTQOptions,
        HessianAccumulator,
        gptq_columns,
        inverse_hessian,
    )
    from zeropoint.gguf.gptq_grids import block_grid

    options = GPTQOptions(percdamp=0.1, act_order=True)
    out, widths, rate = 1024, (512, 1536), {"H": [], "inv": [], "loop": []}
    for n_in in widths:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2048, n_in, generator=g)  # (tokens, in)
        w = 0.02 * torch.randn(out, n_in, generator=g)  # (out, in)

        def hessian():
            acc = HessianAccumulator(n_in)
            acc.add(x)
            return acc.hessian

        H = hessian()
        inverse = inverse_hessian(H, options)
        grid = block_grid("Q4_K", w, None)
        rate["H"].append(median_time(hessian, runs) / (x.shape[0] * n_in**2))
        rate["inv"].append(median_time(lambda: inverse_hessian(H, options), runs) / n_in**3)
        rate["loop"].append(median_time(lambda: gptq_columns(w, inverse, grid, options), runs)
                            / (out * n_in))
        print(f"  gptq {out} x {n_in}: Hessian of 2048 tokens, inverse, loop "
              f"{rate['loop'][-1] * out * n_in:.2f} s")
    (r1, r2), (i1, i2) = rate["loop"], widths
    c_mm = max(0.0, (r2 - r1) / (i2 - i1))
    return {"H": rate["H"][-1], "inv": rate["inv"][-1], "col": max(0.0, r1 - c_mm * i1),
            "mm": c_mm}


def score_cost(runs: int) -> tuple[float, float]:
    """(seconds per scored token per parameter under llama.cpp, torch forward seconds per token
    per parameter) on SmolLM2-135M."""
    from zeropoint.gguf.llama_cpp import llama_cpp_perplexity
    from zeropoint.models.evaluate import default_text
    from zeropoint.models.load import load_model
    from zeropoint.models.source import default_model_path

    path, params = default_model_path(), 134.5e6
    text = default_text()
    result = []
    t = median_time(lambda: result.append(llama_cpp_perplexity(path, text, max_tokens=1024)),
                    runs)
    per_token = t / result[-1].tokens / params
    loaded = load_model(path, progress=False)
    ids = torch.randint(0, 1000, (4, 256))
    with torch.no_grad():
        f = median_time(lambda: loaded.model(input_ids=ids, use_cache=False), runs)
    return per_token, f / ids.numel() / params


def linears(hidden, inner, kv):
    """(out, in, shares_input_with_previous) of one Llama decoder layer's Linears."""
    return [(hidden, hidden, False), (kv, hidden, True), (kv, hidden, True),
            (hidden, hidden, False), (inner, hidden, False), (inner, hidden, True),
            (hidden, inner, False)]


def project(make, gptq, c_tok, c_fwd) -> None:
    print("\nprojected 20-variant sweep (7 types x rtn, hqq; 6 gptq), a node = this machine "
          "(2 cores):")
    print(f"{'model':12s} {'params':>7s} {'1 node':>10s} {'4 nodes':>10s} {'16 nodes':>10s} "
          f"{'GPTQ path':>10s} {'memory/node':>12s}")
    for name, (hidden, inner, layers, kv, vocab) in MODELS.items():
        per_layer = sum(o * i for o, i, _ in linears(hidden, inner, kv))
        params = layers * per_layer + 2 * vocab * hidden
        rtn = sum(params * make["rtn"][t] for t in TYPES)
        hqq = sum(params * make["hqq"][t] for t in TYPES)
        layer_work, layer_path = 0.0, 0.0
        for out, n_in, shared in linears(hidden, inner, kv):
            h = 0 if shared else T_CAL * n_in**2 * gptq["H"] + n_in**3 * gptq["inv"]
            loop = out * n_in * gptq["col"] + out * n_in**2 * gptq["mm"]
            layer_work += h + loop
            layer_path += h + (0 if shared else loop)  # a stage's largest Linear, roughly
        forward = T_CAL * params * c_fwd * 1.3  # true-sequential: ~1.3 forwards
        gptq_one = layers * layer_work + forward
        gptq_path = layers * layer_path + forward
        score = (20 + 1) * T_SCORE * params * c_tok
        total = rtn + hqq + 6 * gptq_one + score
        cells = [max(total / n, gptq_path) for n in (1, 4, 16)]
        largest = max(o * i for o, i, _ in linears(hidden, inner, kv))
        widest = max(i for _, i, _ in linears(hidden, inner, kv))
        memory = 2 * 4 * largest + 2 * 4 * widest**2 + 2 * 4 * T_CAL * hidden
        print(f"{name:12s} {params / 1e9:6.1f}B " + " ".join(f"{c / 3600:9.1f}h" for c in cells)
              + f" {gptq_path / 3600:9.1f}h {memory / 2**30:10.1f} GiB")
        print(f"  one variant: rtn {rtn / 7 / 60:.1f} min, hqq {hqq / 7 / 60:.1f} min, gptq "
              f"{gptq_one / 3600:.1f} h, scoring {score / 21 / 60:.1f} min")


def ray_overhead(runs: int) -> None:
    import copy

    from zeropoint.algorithms.sequential import calibration_ids
    from zeropoint.algorithms.solvers import LocalSolver, RaySolver
    from zeropoint.calibrate.texts import default_calibration_text
    from zeropoint.gguf.gptq import gptq_gguf
    from zeropoint.models.load import load_model
    from zeropoint.models.source import default_model_path

    loaded = load_model(default_model_path(), progress=False)
    loaded.model.model.layers = loaded.model.model.layers[:2]
    ids = calibration_ids(loaded.tokenizer, default_calibration_text(), 4, 256)
    times = {"local": [], "ray": []}
    with RaySolver("local") as ray_solver:
        for run in range(runs + 1):  # the first round warms up (kernels, Ray's workers)
            for kind, solver in (("local", LocalSolver()), ("ray", ray_solver)):
                twin = copy.copy(loaded)
                twin.model = copy.deepcopy(loaded.model)
                r = gptq_gguf(twin, f"/tmp/sweep_cost_{kind}.gguf", "Q4_K_M", ids, solver=solver)
                if run:
                    times[kind].append(r.gptq_seconds)
        stats = ray_solver.stats
        runs += 1
    local, ray = statistics.median(times["local"]), statistics.median(times["ray"])
    print(f"\nGPTQ pass, SmolLM2 first 2 blocks, Q4_K_M: local ({torch.get_num_threads()} "
          f"threads) {local:.2f} s, Ray (local cluster, "
          f"1-CPU tasks) {ray:.2f} s: x{ray / local:.2f}; {stats.jobs // runs} tasks a run, "
          f"{stats.sent_bytes / runs / 2**20:.1f} MiB sent, "
          f"{stats.returned_bytes / runs / 2**20:.2f} MiB back a run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ray", action="store_true", help="also measure the Ray GPTQ overhead")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray GPTQ overhead")
    ap.add_argument("--threads", type=int, default=2, help="torch threads here (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ray_only:
        return ray_overhead(args.runs)
    make = make_costs(args.runs)
    print("make, ns per weight (4096 x 4096 float32):")
    for method in make:
        print(f"  {method}: " + ", ".join(f"{t} {make[method][t] * 1e9:.1f}" for t in TYPES))
    gptq = gptq_costs(args.runs)
    c_tok, c_fwd = score_cost(args.runs)
    print("  gptq units: " + ", ".join(f"c_{k} {v:.3g} s" for k, v in gptq.items()))
    print(f"  scoring (llama.cpp) {c_tok * 1e9:.3f} ns per token per parameter; torch forward "
          f"{c_fwd * 1e9:.3f} ns per token per parameter")
    project(make, gptq, c_tok, c_fwd)
    if args.ray:
        ray_overhead(args.runs)


if __name__ == "__main__":
    main()
