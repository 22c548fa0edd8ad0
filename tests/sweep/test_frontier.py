import random

import pytest

from zeropoint.sweep.frontier import pareto_front, parse_budgets, recommend


def _dominated(row, rows):
    return any(o["bytes"] <= row["bytes"] and o["perplexity"] <= row["perplexity"]
               and (o["bytes"], o["perplexity"]) != (row["bytes"], row["perplexity"]) for o in rows)


@pytest.mark.parametrize("seed", range(20))
def test_front_is_exactly_the_non_dominated_rows(seed):
    rnd = random.Random(seed)
    rows = [{"variant": f"v{i}", "bytes": rnd.randint(1, 12), "perplexity": rnd.randint(1, 12)}
            for i in range(rnd.randint(1, 25))]
    front = pareto_front(rows)
    expected = {(r["bytes"], r["perplexity"]) for r in rows if not _dominated(r, rows)}
    assert {(r["bytes"], r["perplexity"]) for r in front} == expected
    assert len(front) == len(expected)  # one row per point, even when variants tie
    assert [r["bytes"] for r in front] == sorted(r["bytes"] for r in front)


@pytest.mark.parametrize("seed", range(10))
def test_recommend_is_the_best_row_that_fits(seed):
    rnd = random.Random(seed)
    rows = [{"variant": f"v{i}", "bytes": rnd.randint(1, 100), "perplexity": rnd.random()}
            for i in range(15)]
    budgets = [0, 10, 50, 100]
    for budget, best in recommend(rows, budgets).items():
        fitting = [r for r in rows if r["bytes"] <= budget]
        if not fitting:
            assert best is None
        else:
            assert best["perplexity"] == min(r["perplexity"] for r in fitting)


def test_budgets_parse_units():
    assert parse_budgets("100MB, 1.5GiB,2000") == [100 * 10**6, int(1.5 * 2**30), 2000]
    assert parse_budgets("64MiB") == [64 * 2**20]
    for bad in ("lots", "10 parsecs", "", "-5MB"):
        with pytest.raises(ValueError, match="budget|at least one"):
            parse_budgets(bad)
