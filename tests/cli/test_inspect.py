"""`zeropoint inspect` against independent readers: gguf-py's GGUFReader tensor by tensor, the
file sizes, llama.cpp's own choice of types for a mix, safetensors headers read in the test; and
it runs without torch."""

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from zeropoint.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="session")
def tiny_q4_k_m(tiny_bpe_checkpoint, tmp_path_factory):
    """The tiny checkpoint as F32 GGUF, then quantized to Q4_K_M by llama.cpp itself: its 64-wide
    rows make most tensors fall back from Q4_K."""
    from zeropoint.gguf.llama_cpp import llama_cpp_quantize

    folder = tmp_path_factory.mktemp("inspect")
    f32 = folder / "tiny-f32.gguf"
    assert main(["quantize", str(tiny_bpe_checkpoint), "--type", "F32", "-o", str(f32),
                 "--quiet"]) == 0
    out = folder / "tiny-q4_k_m.gguf"
    llama_cpp_quantize(f32, out, "Q4_K_M")
    return out


@pytest.fixture(scope="session")
def tiny_zeropoint(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect-zp") / "q"
    assert main(["quantize", str(tiny_checkpoint), "-o", str(out), "--scheme", "asymmetric",
                 "--group-size", "32", "--quiet"]) == 0
    return out


def inspect_json(capsys, path, tmp_path):
    out = tmp_path / "inspect.json"
    capsys.readouterr()
    assert main(["inspect", str(path), "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def check_gguf_against_gguf_py(report, path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert [t["name"] for t in report["tensors"]] == [t.name for t in reader.tensors]
    for ours, theirs in zip(report["tensors"], reader.tensors):
        assert ours["type"] == theirs.tensor_type.name, ours["name"]
        assert ours["shape"] == [int(n) for n in reversed(theirs.shape)], ours["name"]
        assert ours["bytes"] == int(theirs.n_bytes), ours["name"]
        assert ours["weights"] == int(theirs.n_elements)
    size = report["size"]
    assert size["file_bytes"] == os.path.getsize(path)
    assert size["header_bytes"] == reader.data_offset
    assert size["tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    # Whatever is neither header nor tensor is the alignment padding between tensors.
    ends = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in reader.tensors)
    gaps = sum(b[0] - a[1] for a, b in zip(ends, ends[1:])) + os.path.getsize(path) - ends[-1][1]
    assert size["padding_bytes"] == gaps
    totals = {row["type"]: row for row in report["totals"]}
    for name in {t.tensor_type.name for t in reader.tensors}:
        of_type = [t for t in reader.tensors if t.tensor_type.name == name]
        assert totals[name]["bytes"] == sum(int(t.n_bytes) for t in of_type)
        assert totals[name]["tensors"] == len(of_type)
    return reader


def test_gguf_agrees_with_gguf_py_and_llama_cpp_choices(tiny_q4_k_m, tmp_path, capsys):
    report, printed = inspect_json(capsys, tiny_q4_k_m, tmp_path)
    reader = check_gguf_against_gguf_py(report, tiny_q4_k_m)
    meta = report["metadata"]
    assert meta["architecture"] == "llama" and meta["file_type"] == "Q4_K_M"
    embd_rows = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
    assert meta["vocab_size"] == embd_rows
    assert meta["context_length"] == 256
    # The fallbacks: exactly the 2-D weights llama.cpp did not give Q4_K, each of which the
    # ported rules explain as llama.cpp's own choice.
    not_q4_k = {t.name for t in reader.tensors
                if len(t.shape) == 2 and t.tensor_type.name != "Q4_K"}
    assert not_q4_k and {f["name"] for f in report["fallbacks"]} == not_q4_k
    for f in report["fallbacks"]:
        assert f["llama_cpp_type"] == f["type"] and "not llama.cpp's choice" not in f["reason"]
        assert f["name"] in printed
    assert "rows of 64 values do not tile Q4_K's blocks of 256, so Q5_0" in printed
    head = report["embedding_and_head"]
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    output = next(t for t in reader.tensors if t.name == "output.weight")
    assert head["bytes"] == int(embd.n_bytes) + int(output.n_bytes) and not head["tied"]
    assert head["share"] == pytest.approx(head["bytes"] / report["size"]["tensor_bytes"])


def test_a_choice_no_mix_makes_is_named(tiny_bpe_checkpoint, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"default": "Q8_0", "tensors": {"ffn_down": "Q4_0"}}))
    out = tmp_path / "mixed.gguf"
    assert main(["quantize", str(tiny_bpe_checkpoint), "--type", str(recipe), "-o", str(out),
                 "--quiet"]) == 0
    report, _ = inspect_json(capsys, out, tmp_path)
    check_gguf_against_gguf_py(report, out)
    fallbacks = {f["name"]: f for f in report["fallbacks"]}
    assert set(fallbacks) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert "not llama.cpp's choice for Q8_0, which is Q8_0" in fallbacks["blk.0.ffn_down.weight"][
        "reason"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_ggufs_agree_with_gguf_py(which, tmp_path, capsys):
    from zeropoint.models.source import default_model_path, gemma3_model_path

    path = default_model_path() if which == "smollm2" else gemma3_model_path()
    report, printed = inspect_json(capsys, path, tmp_path)
    check_gguf_against_gguf_py(report, path)
    if which == "gemma3":  # a Q4_K_M mix made by llama.cpp: every fallback is its rule
        assert report["metadata"]["file_type"] == "Q4_K_M"
        assert len(report["fallbacks"]) > 50
        assert all(f["llama_cpp_type"] == f["type"] for f in report["fallbacks"])
        assert report["embedding_and_head"]["tied"]


def safetensors_header(path):
    """The JSON header of a safetensors file, read here byte by byte (the format's spec)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def test_zeropoint_directory_totals_equal_its_files(tiny_zeropoint, tmp_path, capsys):
    report, printed = inspect_json(capsys, tiny_zeropoint, tmp_path)
    n, header = safetensors_header(tiny_zeropoint / "model.safetensors")
    header.pop("__metadata__", None)
    stored = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    file_bytes = os.path.getsize(tiny_zeropoint / "model.safetensors")
    assert report["size"]["file_bytes"] == file_bytes
    assert report["size"]["header_bytes"] == 8 + n
    assert report["size"]["tensor_bytes"] == sum(stored.values()) == file_bytes - 8 - n
    manifest = json.loads((tiny_zeropoint / "zeropoint.json").read_text())
    assert report["size"]["tensor_bytes"] == manifest["quantized_bytes"] + manifest["kept_bytes"]
    tensors = {t["name"]: t for t in report["tensors"]}
    for name, meta in manifest["quantized"].items():
        parts = [k for k in stored if k.rsplit(".", 1)[0] == name]
        assert sorted(p.rsplit(".", 1)[1] for p in parts) == ["packed", "scale", "zero_point"]
        t = tensors[name]
        assert t["bytes"] == sum(stored[p] for p in parts)
        assert t["type"] == "int4 asym g32" and t["shape"] == meta["shape"]
        # 4-bit codes, a float32 scale and a uint8 zero-point per group of 32
        assert t["bits_per_weight"] == pytest.approx(4 + (32 + 8) / 32)
    embed = tensors["model.embed_tokens.weight"]
    assert embed["type"] == "F32" and embed["bytes"] == stored["model.embed_tokens.weight"]
    head = report["embedding_and_head"]
    assert head["bytes"] == embed["bytes"] + tensors["lm_head.weight"]["bytes"]
    meta = report["metadata"]
    assert meta["architecture"] == "llama" and meta["vocab_size"] == 128
    assert meta["file_type"] == "int4 asym g32, float: lm_head"
    totals = {row["type"]: row for row in report["totals"]}
    assert totals["int4 asym g32"]["bytes"] == manifest["quantized_bytes"]
    assert totals["int4 asym g32"]["weights"] == manifest["quantized_params"]
    assert sum(r["weights"] for r in report["totals"]) == sum(
        math.prod(t["shape"]) for t in report["tensors"])
    assert "int4 asym g32" in printed and "embedding and head" in printed


def test_inspect_imports_neither_torch_nor_transformers(tiny_q4_k_m, tiny_zeropoint):
    probe = ("import sys, contextlib, io\n"
             "from zeropoint.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    codes = [main(['inspect', p]) for p in sys.argv[1:]]\n"
             "print(codes, [m for m in ('torch', 'transformers') if m in sys.modules])\n")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", probe, str(tiny_q4_k_m), str(tiny_zeropoint)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[0, 0] []"


def written(path, data: bytes, returned=None):
    path.write_bytes(data)
    return returned or path


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing.gguf", "does not exist"),
    (lambda p: written(p / "config.json", b"{}", p), "Hugging Face checkpoint directory"),
    (lambda p: written(p / "a.gguf", b"", p), "it holds .gguf files: pass one of them"),
    (lambda p: written(p / "empty.gguf", b""), "is empty"),
    (lambda p: written(p / "bad.gguf", b"GGUF\x03\0\0\0" + b"\xff" * 8), "bad.gguf"),
    (lambda p: written(p / "notes.txt", b"hi"), "neither a .gguf file"),
])
def test_bad_paths_exit_2_with_a_message(tmp_path, capsys, make, message):
    path = make(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zeropoint inspect: error: ") and message in err


def test_a_zeropoint_directory_without_its_shards_is_named(tiny_zeropoint, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_zeropoint, broken)
    (broken / "model.safetensors").unlink()
    assert main(["inspect", str(broken)]) == 2
    assert "has no model*.safetensors files" in capsys.readouterr().err
