"""GGUF -> GGUF requantization and llama.cpp's mixes, against llama.cpp's llama_model_quantize."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from zeropoint.cli import main
from zeropoint.gguf import quantize_blocks
from zeropoint.gguf.llama_cpp import llama_cpp_quantize
from zeropoint.gguf.metadata import MetaValue
from zeropoint.gguf.mixes import (
    MIXES,
    PURE_TYPES,
    ModelParams,
    fallback_type,
    parse_target,
    plan_types,
)
from zeropoint.gguf.reader import read_gguf
from zeropoint.gguf.requantize import requantize
from zeropoint.gguf.writer import TensorData, write_gguf


def k_types_available() -> bool:
    try:
        quantize_blocks(torch.zeros(256), "Q4_K")
        return True
    except ValueError:
        return False


needs_k = pytest.mark.skipif(not k_types_available(), reason="K-quant blocks not available yet")


@pytest.fixture(scope="module")
def default_gguf():
    from zeropoint.models.source import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory, default_gguf):
    """llama.cpp's own quantization of the default model, made once per type."""
    folder, made = tmp_path_factory.mktemp("llama_cpp"), {}

    def get(qtype):
        if qtype not in made:
            made[qtype] = folder / f"{qtype}.gguf"
            llama_cpp_quantize(default_gguf, made[qtype], qtype)
        return made[qtype]

    return get


# --- targets and recipes ----------------------------------------------------------------------


def test_targets_resolve_to_llama_cpp_file_types():
    t = parse_target("q4_k_m")
    assert (t.mix, t.default_type, t.file_type) == ("Q4_K_M", "Q4_K", 15)
    assert parse_target("Q8_0").file_type == 7 and parse_target("Q8_0").mix == "Q8_0"
    pure = parse_target("Q4_K")
    assert (pure.mix, pure.default_type) == (None, "Q4_K")


@pytest.mark.parametrize("spec", ["Q9", "TQ1_0", "Q8_K", "", "Q4_K_XL"])
def test_unknown_types_are_clear_errors(spec):
    with pytest.raises(ValueError, match="unknown type|non-empty") as e:
        parse_target(spec)
    assert "Q4_K_M" in str(e.value)  # the message lists what is accepted


def test_recipe_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"default": "Q4_0", "tensors": {"attn_v": "Q8_0", "ffn_": "Q5_1"}}))
    t = parse_target(str(path))
    assert (t.mix, t.default_type, t.file_type) == ("Q4_0", "Q4_0", 2)
    assert t.overrides == (("attn_v", "Q8_0"), ("ffn_", "Q5_1"))


@pytest.mark.parametrize(("doc", "message"), [
    ({"tensors": {}}, "needs a \"default\""),
    ({"default": "Q3"}, "unknown default"),
    ({"default": "Q4_0", "tensors": {"(": "Q8_0"}}, "bad pattern"),
    ({"default": "Q4_0", "tensors": {"x": "TQ2_0"}}, "names type 'TQ2_0'"),
    ({"default": "Q4_0", "colour": 1}, "unknown key"),
    ({"default": "Q4_0", "pure": "yes"}, "true or false"),
    ([1, 2], "JSON object"),
])
def test_bad_recipes(tmp_path, doc, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        parse_target(str(path))


def test_missing_or_broken_recipe_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        parse_target(str(tmp_path / "none.json"))
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read recipe"):
        parse_target(str(tmp_path / "b.json"))


# --- plans on made-up models ------------------------------------------------------------------

PARAMS = ModelParams("llama", n_layer=2, n_head=4, n_head_kv=2)


def _model(cols=64, ff=96, tied=True):
    names = [("token_embd.weight", "F32", (100, cols)), ("output_norm.weight", "F32", (cols,))]
    if not tied:
        names.append(("output.weight", "F32", (100, cols)))
    for i in range(2):
        names += [(f"blk.{i}.attn_norm.weight", "F32", (cols,)),
                  (f"blk.{i}.attn_q.weight", "F32", (cols, cols)),
                  (f"blk.{i}.attn_v.weight", "F32", (cols // 2, cols)),
                  (f"blk.{i}.ffn_down.weight", "F32", (cols, ff))]
    return names


def test_fallback_chain():
    assert fallback_type(576, "Q4_K") == "Q5_0"
    assert fallback_type(576, "Q6_K") == "Q8_0"
    assert fallback_type(576, "Q5_K") == "Q5_1"
    assert fallback_type(576, "Q3_K") == fallback_type(576, "Q2_K") == "Q4_0"
    assert fallback_type(512, "Q4_K") == "Q4_K"
    assert fallback_type(48, "Q4_K") == "F16"  # not even a 32-block tiles it
    assert fallback_type(48, "Q8_0") == "F16"


def test_plan_rules_on_a_small_model():
    plan = plan_types(_model(), "Q4_0", PARAMS)
    types = plan.types()
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D: kept
    assert types["token_embd.weight"] == "Q8_0"  # tied: output rule Q6_K, 64 cols -> Q8_0
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
    assert [c.name for c in plan.fallbacks] == ["token_embd.weight"]
    untied = plan_types(_model(tied=False), "Q4_0", PARAMS).types()
    assert untied["token_embd.weight"] == "Q4_0" and untied["output.weight"] == "Q8_0"
    wide = _model(cols=256, ff=256)
    assert plan_types(wide, "Q4_0", PARAMS).types()["token_embd.weight"] == "Q6_K"
    assert plan_types(wide, "Q8_0", PARAMS).types()["token_embd.weight"] == "Q8_0"
    # llama.cpp's order: non-block tensors first, then by block, by name within a block
    assert [c.name for c in plan.choices][:3] == ["output_norm.weight", "token_embd.weight",
                                                  "blk.0.attn_norm.weight"]


def test_recipe_patterns_override_the_mix_and_still_fall_back(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"default": "Q4_K_M", "tensors": {
        r"blk\.0\.attn_q": "Q8_0", "attn_q": "Q6_K", "token_embd": "F16"}}))
    types = plan_types(_model(cols=64), str(path), PARAMS).types()
    assert types["blk.0.attn_q.weight"] == "Q8_0"  # first matching pattern wins
    assert types["blk.1.attn_q.weight"] == "Q8_0"  # Q6_K's 256-block does not tile 64: fallback
    assert types["token_embd.weight"] == "F16"
    pure = tmp_path / "p.json"
    pure.write_text(json.dumps({"default": "Q4_0", "pure": True}))
    assert plan_types(_model(), str(pure), PARAMS).types()["token_embd.weight"] == "Q4_0"


def test_moe_models_are_refused():
    with pytest.raises(ValueError, match="mixture-of-experts"):
        plan_types(_model(), "Q4_K_M", ModelParams("llama", 2, 4, 2, n_expert=8))


def test_requantize_a_small_file_round_trips_values(tmp_path, gen):
    x = torch.randn(8, 64, generator=gen)
    meta = {"general.architecture": MetaValue.string("llama"),
            "llama.block_count": MetaValue.u32(1), "llama.attention.head_count": MetaValue.u32(2)}
    src = tmp_path / "src.gguf"
    write_gguf(src, meta, [TensorData("blk.0.ffn_up.weight", "F32", (8, 64), x),
                           TensorData("blk.0.ffn_norm.weight", "F32", (64,), x[0])])
    report = requantize(src, tmp_path / "q.gguf", "Q8_0")
    out = read_gguf(tmp_path / "q.gguf")
    assert out["blk.0.ffn_up.weight"].type == "Q8_0" and out["blk.0.ffn_norm.weight"].type == "F32"
    assert out.get("general.file_type") == 7 and out.get("general.quantization_version") == 2
    assert list(out.metadata)[-2:] == ["general.quantization_version", "general.file_type"]
    expected = quantize_blocks(x, "Q8_0").numpy().reshape(-1)
    assert np.array_equal(out.raw("blk.0.ffn_up.weight"), expected)
    assert report.n_elements == 8 * 64 + 64
    assert report.file_bytes == (tmp_path / "q.gguf").stat().st_size
    with pytest.raises(ValueError, match="is the input file"):
        requantize(src, src, "Q8_0")


def test_convert_generators_taken_in_turns_on_one_thread():
    # Legacy -> legacy pieces come from a buffer each thread reuses; a second convert() running
    # at the same time on the same thread must not write into the first one's pieces.
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from zeropoint.gguf.convert import convert

    rows = 3 * (1 << 20) // 64  # 3 pieces each
    a, b = (quantize_blocks(torch.randn(rows, 64, generator=torch.Generator().manual_seed(s)),
                            "Q4_1").numpy().reshape(-1) for s in (31, 32))
    ga, gb = convert(a, "Q4_1", (rows, 64), "Q8_0"), convert(b, "Q4_1", (rows, 64), "Q8_0")
    pieces_a, pieces_b = [], []
    for pa, pb in zip(ga, gb):
        pieces_a.append(pa.copy())
        pieces_b.append(pb.copy())
        assert not np.shares_memory(pa, pb)
    for raw, pieces in ((a, pieces_a), (b, pieces_b)):  # gguf-py: dequantize, then quantize
        x = dequantize(raw, GGMLQuantizationType.Q4_1).astype(np.float32).reshape(rows, 64)
        assert np.array_equal(np.concatenate(pieces),
                              quantize(x, GGMLQuantizationType.Q8_0).reshape(-1))


def test_a_block_the_target_cannot_store_names_tensor_and_block(tmp_path):
    # Q8_0 stores |x| up to 127 * 65504; Q4_0's d = max / 8 overflows fp16 long before that.
    # Rows of 32 and a block far into the tensor: past the first piece that convert makes.
    rows = 3 * (1 << 20) // 32
    x = torch.randn(rows, 32, generator=torch.Generator().manual_seed(30))
    bad = rows - 2
    x[bad, 7] = 127 * 60000.0
    meta = {"general.architecture": MetaValue.string("llama"),
            "llama.block_count": MetaValue.u32(1), "llama.attention.head_count": MetaValue.u32(2)}
    src, out = tmp_path / "src.gguf", tmp_path / "q.gguf"
    write_gguf(src, meta, [TensorData("blk.0.ffn_up.weight", "Q8_0", (rows, 32),
                                      quantize_blocks(x, "Q8_0"))])
    with pytest.raises(ValueError, match=rf"blk.0.ffn_up.weight: Q4_0 block {bad}: its scale"):
        requantize(src, out, "Q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]  # nothing half-written


# --- the default model against llama.cpp ------------------------------------------------------

_TYPE_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^(]*"
                        r"(?:\((\S+)\))?\s*$")
_FALLBACK_LINE = re.compile(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+\d+ \(required "
                            r"for type\s+(\S+)\) (?:\(WARNING: must use F16[^)]*\) )?-> falling "
                            r"back to\s+(\S+)")


def llama_cpp_plan(log: str) -> tuple[dict[str, str], set[tuple[str, str, str]]]:
    """({tensor: type}, {(tensor, wanted, fallback)}) from llama_model_quantize's log."""
    types = {}
    for line in log.splitlines():
        m = _TYPE_LINE.match(line)
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    falls = {(m[0], m[2].upper(), m[3].upper()) for m in _FALLBACK_LINE.findall(log)}
    return types, falls


@pytest.mark.slow
@pytest.mark.parametrize("mix", [*MIXES, *PURE_TYPES])
def test_plan_and_fallbacks_match_llama_cpp(default_gguf, tmp_path, mix):
    """Every tensor's type, and every fallback, as llama_model_quantize chooses them (dry run)."""
    log = llama_cpp_quantize(default_gguf, tmp_path / "dry.gguf", mix, dry_run=True)
    theirs, their_falls = llama_cpp_plan(log)
    src = read_gguf(default_gguf)
    plan = plan_types([(t.name, t.type, t.shape) for t in src.tensors], mix,
                      ModelParams.from_metadata(src.metadata))
    assert len(theirs) == len(src.tensors) == 272
    assert plan.types() == theirs
    assert [c.name for c in plan.choices] == list(theirs)  # and in llama.cpp's order
    assert {(c.name, c.wanted, c.type) for c in plan.fallbacks} == their_falls
    if mix.startswith(("Q2_K", "Q3_K", "Q4_K", "Q5_K")):
        # DESIGN.md: 576-wide tensors fall back, the 1536-wide ffn_down ones keep K types
        assert all(plan.types()[f"blk.{i}.ffn_down.weight"].endswith("_K") for i in range(30))
        assert len(their_falls) >= 180


def _assert_same_tensors(ours_path, theirs_path):
    ours, theirs = read_gguf(ours_path), read_gguf(theirs_path)
    assert [(t.name, t.type, t.shape) for t in ours.tensors] == \
        [(t.name, t.type, t.shape) for t in theirs.tensors]
    differing = [t.name for t in ours.tensors
                 if not np.array_equal(ours.raw(t), theirs.raw(t.name))]
    assert not differing, f"{len(differing)} tensors differ from llama.cpp's, e.g. {differing[:3]}"
    assert ours.metadata == theirs.metadata
    assert ours_path.read_bytes() == theirs_path.read_bytes()  # the whole file, header included


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_cli_requantize_is_llama_cpp_bit_for_bit(llama_files, tmp_path, capsys, qtype):
    out = tmp_path / f"{qtype}.gguf"
    assert main(["quantize", "--type", qtype, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bits/weight" in printed and "file" in printed
    _assert_same_tensors(out, llama_files(qtype))
    if qtype == "Q8_0":
        assert "no fallbacks" in printed
    else:  # tied token_embd: Q6_K -> Q8_0, as llama.cpp
        assert "1 fallback" in printed
        assert "Q6_K -> Q8_0 (rows of 576): token_embd.weight" in printed


@pytest.mark.slow
@needs_k
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q6_K"])
def test_k_mixes_are_llama_cpp_bit_for_bit(default_gguf, llama_files, tmp_path, mix):
    out = tmp_path / f"{mix}.gguf"
    report = requantize(default_gguf, out, mix)
    assert any(c.type.endswith("_K") for c in report.plan.choices)
    _assert_same_tensors(out, llama_files(mix))


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_0", pytest.param("Q4_K_M", marks=needs_k)])
def test_llama_cpp_runs_our_file_with_its_own_perplexity(default_gguf, llama_files, tmp_path,
                                                         qtype):
    from zeropoint.gguf.llama_cpp import llama_cpp_generate, llama_cpp_perplexity, open_llama
    from zeropoint.models.evaluate import default_text

    out = tmp_path / f"{qtype}.gguf"
    requantize(default_gguf, out, qtype)
    text = default_text()
    llm = open_llama(out, n_ctx=256)
    ours = llama_cpp_perplexity(out, text, window=256, max_tokens=256, llm=llm)
    sample = llama_cpp_generate(llm, max_new_tokens=4)
    llm.close()
    theirs = llama_cpp_perplexity(llama_files(qtype), text, window=256, max_tokens=256)
    assert ours.tokens == theirs.tokens == 255
    assert ours.perplexity == theirs.perplexity  # same bytes, same logits
    assert 5 < ours.perplexity < 60
    assert sample.strip()


# --- the command's errors ---------------------------------------------------------------------


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, default_gguf):
    out = tmp_path / "o.gguf"
    assert main(["quantize", "--type", "Q9_9", "-o", str(out)]) == 2
    assert "unknown type 'Q9_9'" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(default_gguf.read_bytes()[:5000])
    assert main(["quantize", str(bad), "--type", "Q8_0", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err
    bad.write_bytes(b"not a gguf file at all")
    assert main(["quantize", str(bad), "--type", "Q8_0", "-o", str(out)]) == 2
    assert "magic" in capsys.readouterr().err
    out.write_bytes(b"x")
    assert main(["quantize", "--type", "Q8_0", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf.partial").exists()
    missing = str(tmp_path / "nope.gguf")
    assert main(["quantize", missing, "--type", "Q8_0", "-o", str(tmp_path / "p.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
