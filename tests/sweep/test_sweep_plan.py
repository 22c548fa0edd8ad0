"""The sweep's planning and execution machinery, on tasks that take milliseconds."""
import json
import operator

import pytest

from zeropoint.sweep import SweepOptions, Variant, parse_variants
from zeropoint.sweep.executors import LocalPool, Result, Task
from zeropoint.sweep.variants import make_key, score_key


def test_variants_are_types_by_methods_in_order():
    assert parse_variants("q4_0, Q8_0,Q4_0", "rtn,HQQ") == [
        Variant("Q4_0", "rtn"), Variant("Q4_0", "hqq"), Variant("Q8_0", "rtn"),
        Variant("Q8_0", "hqq")]


@pytest.mark.parametrize("types, methods, match", [
    ("Q4_0,Q9_9", "rtn", "Q9_9"), ("Q4_0", "rtn,awq", "awq"), (",", "rtn", "at least one")])
def test_unknown_names_are_refused(types, methods, match):
    with pytest.raises(ValueError, match=match):
        parse_variants(types, methods)


def test_keys_follow_what_changes_the_output(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x" * 10)
    text = tmp_path / "t.txt"
    text.write_text("abc")
    o = SweepOptions(source=str(src), text=str(text))
    rtn, gptq = Variant("Q4_0", "rtn"), Variant("Q4_0", "gptq")
    assert make_key(o, rtn) == make_key(SweepOptions(source=str(src)), rtn)  # text is scoring only
    assert make_key(o, rtn) != make_key(o, Variant("Q5_0", "rtn"))
    assert make_key(o, rtn) == make_key(SweepOptions(str(src), calib_tokens=99), rtn)
    assert make_key(o, gptq) != make_key(SweepOptions(str(src), calib_tokens=99), gptq)
    k = make_key(o, rtn)
    assert score_key(o, k) != score_key(SweepOptions(str(src), str(text), max_tokens=99), k)
    scores = score_key(o, k)
    text.write_text("abcd")  # the scoring text changed: scores are stale, the file is not
    assert score_key(o, k) != scores
    assert make_key(o, rtn) == k
    src.write_bytes(b"y" * 11)  # the source changed: everything is stale
    assert make_key(o, rtn) != k


def test_local_pool_runs_a_graph_in_dependency_order():
    done = []
    tasks = [Task("a", operator.add, (2, 3)), Task("b", operator.mul, (Result("a"), 10)),
             Task("c", operator.sub, (Result("b"), Result("a"))), Task("d", abs, (-7,))]
    results = LocalPool(2, lambda t, r: done.append(t.name)).run(tasks)
    assert results == {"a": 5, "b": 50, "c": 45, "d": 7}
    assert done.index("a") < done.index("b") < done.index("c")


def test_graph_must_name_earlier_tasks():
    with pytest.raises(ValueError, match="do not come before"):
        LocalPool(1).run([Task("b", abs, (Result("a"),)), Task("a", abs, (1,))])
    with pytest.raises(ValueError, match="two sweep tasks"):
        LocalPool(1).run([Task("a", abs, (1,)), Task("a", abs, (2,))])


def test_a_failed_task_stops_the_sweep():
    with pytest.raises(ZeroDivisionError):
        LocalPool(1).run([Task("a", operator.truediv, (1, 0))])


def test_stale_or_missing_records_are_not_done(tmp_path):
    from zeropoint.sweep.tasks import read_record, record_path

    f = tmp_path / "v.gguf"
    f.write_bytes(b"1234")
    path = record_path(tmp_path, "v", "make")
    path.parent.mkdir()
    path.write_text(json.dumps({"key": "k1", "file": str(f), "bytes": 4}))
    assert read_record(tmp_path, "v", "make", "k1")["bytes"] == 4
    assert read_record(tmp_path, "v", "make", "k2") is None  # other options
    f.write_bytes(b"123")  # the file changed under the record
    assert read_record(tmp_path, "v", "make", "k1") is None
    path.write_text("{not json")
    assert read_record(tmp_path, "v", "make", "k1") is None
