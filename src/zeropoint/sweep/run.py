"""The whole sweep: plan the tasks that are not done yet, run them locally or on Ray, gather the
records, mark the frontier, recommend per budget, and write the table, CSV, JSON, PNG and HTML."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import report, tasks
from .executors import LocalPool, Result, Task, ray_executor
from .frontier import pareto_front, recommend
from .importance import resolve_imatrix, unmakeable
from .variants import SweepOptions, Variant, make_key, options_dict, score_key

REFERENCE_TYPE = Variant("F16", "rtn")  # what a Hugging Face source is scored as


@dataclass
class SweepResult:
    rows: list[dict]  # the reference first, then each variant: its make and score records
    front: list[dict]  # the Pareto-optimal variants, by size
    recommendations: dict[int, dict | None]  # budget in bytes -> best variant that fits
    loss: str  # the quality figure the frontier is drawn on
    ran: list[str]  # the tasks this run did (the rest were done before)


def sweep(
    options: SweepOptions,
    variants: Sequence[Variant],
    out_dir: str | os.PathLike,
    *,
    budgets: Sequence[int] = (),
    jobs: int | None = None,
    ray_address: str | None = None,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Make and score every variant of `options.source` not already done in `out_dir` (same
    key: source, options, zeropoint version), then report all of them. `jobs` tasks at once in a
    local process pool (default: one per options.threads CPUs), or on the Ray cluster at
    `ray_address` ('local' starts one here), where GPTQ variants also solve each layer's Linears
    as parallel tasks."""
    from ..models.source import FLOAT_KINDS, resolve_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(options.source, FLOAT_KINDS)
    options = replace(options, source=str(source.path))
    options = resolve_imatrix(options, out / tasks.RECORDS, log)
    refused = unmakeable(options, variants)
    if refused:
        raise ValueError("these variants cannot be made: " + "; ".join(refused) +
                         ". Pass --imatrix FILE or --imatrix auto, or leave those types out")
    reference_made = None if source.is_gguf else REFERENCE_TYPE
    graph, records = _plan(options, variants, out, reference_made, bool(ray_address))
    ran: list[str] = []

    def on_done(task: Task, record: dict) -> None:
        ran.append(task.name)
        log(f"{task.name}: " + _summary(record))

    if graph:
        cpus = os.cpu_count() or 1
        executor = ray_executor(ray_address, on_done) if ray_address else \
            LocalPool(jobs or max(1, cpus // options.threads), on_done)
        records.update(executor.run(graph))
    return _gather(options, variants, out, records, budgets, ran)


def _plan(options: SweepOptions, variants: Sequence[Variant], out: Path,
          reference_made: Variant | None, on_ray: bool = False
          ) -> tuple[list[Task], dict[str, dict]]:
    """The tasks still to run, and the records of those already done (by task name). On Ray,
    a GPTQ variant's make task solves its layers' Linears as tasks of their own."""
    graph: list[Task] = []
    done: dict[str, dict] = {}
    cpus, out_s = options.threads, str(out)

    def need(stage: str, name: str, key: str, fn, args) -> object:
        """The record if done with this key, else Result of a new task that makes it."""
        record = tasks.read_record(out, name, stage, key)
        if record is not None:
            done[f"{stage} {name}"] = record
            return record
        graph.append(Task(f"{stage} {name}", fn, args, cpus))
        return Result(f"{stage} {name}")

    made_ref = None
    if reference_made:
        made_ref = need("make", reference_made.name, make_key(options, reference_made),
                        tasks.make_variant, (options, reference_made, out_s))
    ref_made_key = make_key(options, reference_made) if reference_made else tasks.REFERENCE
    reference = need("score", tasks.REFERENCE, score_key(options, ref_made_key),
                     tasks.score_reference, (options, out_s, made_ref))
    for v in variants:
        mkey = make_key(options, v)
        made = need("make", v.name, mkey, tasks.make_variant,
                    (options, v, out_s, on_ray and v.method == "gptq"))
        need("score", v.name, score_key(options, mkey), tasks.score_variant,
             (options, v, out_s, made, reference))
    return graph, done


def _gather(options, variants, out, records, budgets, ran) -> SweepResult:
    reference = records[f"score {tasks.REFERENCE}"]
    rows = [dict(reference, variant="reference (" + Path(reference["file"]).name + ")")]
    for v in variants:
        rows.append({**records[f"make {v.name}"], **records[f"score {v.name}"],
                     "key": records[f"make {v.name}"]["key"]})
    loss = "kld_mean" if all("kld_mean" in r for r in rows[1:]) else "perplexity"
    front = pareto_front(rows[1:], loss=loss)
    for r in rows[1:]:
        r["frontier"] = any(r is f for f in front)
    recs = recommend(rows[1:], budgets, loss=loss)
    result = SweepResult(rows, front, recs, loss, ran)
    _write_reports(options, out, result)
    return result


def recommendation_lines(result: SweepResult) -> list[str]:
    lines = []
    for budget, row in result.recommendations.items():
        best = "nothing fits" if row is None else \
            f"{row['variant']} ({row['bytes'] / 2**20:.1f} MiB, {result.loss} {row[result.loss]:.4g})"
        lines.append(f"{budget / 2**20:,.1f} MiB: {best}")
    return lines


def _write_reports(options: SweepOptions, out: Path, result: SweepResult) -> None:
    title = f"zeropoint sweep of {Path(options.source).name}"
    report.write_csv(out / "sweep.csv", result.rows)
    report.write_json(out / "sweep.json", {
        "options": options_dict(options), "loss": result.loss, "rows": result.rows,
        "frontier": [r["variant"] for r in result.front],
        "recommendations": {str(b): (r and r["variant"]) for b, r in result.recommendations.items()},
    })
    png = report.plot_png(result.rows[1:], result.front, result.loss, title)
    with report.atomic_path(out / "frontier.png") as tmp:
        tmp.write_bytes(png)
    report.write_html(out / "sweep.html", result.rows, png, title, recommendation_lines(result))


def _summary(record: dict) -> str:
    if "perplexity" in record:
        return f"perplexity {record['perplexity']:.3f}, {record['tokens_per_second']:.1f} tok/s"
    return f"{record['bytes'] / 2**20:.1f} MiB, {record['bits_per_weight']:.3f} bits/weight"
