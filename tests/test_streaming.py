"""Streaming quantization of safetensors checkpoints: bit-exact against quantizing the loaded
tensors, recipe rules, manifest sizes, errors, and a memory bound measured in a child process."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from zeropoint import core
from zeropoint.modeldir import streaming
from zeropoint.modeldir.format import INDEX, MANIFEST, read_manifest, read_tensors
from zeropoint.modeldir.writer import CheckpointWriter
from zeropoint.qtensor import QTensor
from zeropoint.recipe import Recipe, Rule
from zeropoint.spec import QuantSpec

G32 = QuantSpec(4, "symmetric", "per_group", group_size=32)
INT8_CHANNEL = QuantSpec(8, "asymmetric", "per_channel")


def make_llama(directory: Path, dtype=torch.float32, tie=False) -> Path:
    """A tiny llama checkpoint in several shards, as transformers writes it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=100,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # norms are all ones at init: make kept tensors worth comparing
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, max_shard_size="50KB")
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def source_state(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in directory.glob("*.safetensors"):
        state.update(load_file(f))
    return state


def run(src: Path, tmp_path: Path, recipe: Recipe, **kw):
    out = tmp_path / "out"
    out.mkdir()
    manifest = streaming.quantize_checkpoint(src, out, recipe, progress=False, **kw)
    return out, manifest


def assert_same_qtensor(q: QTensor, ref: QTensor, name: str):
    assert q.spec == ref.spec and q.shape == ref.shape and q.dtype == torch.float32, name
    assert torch.equal(q.packed, ref.packed), name
    assert torch.equal(q.scale, ref.scale), name
    assert (q.zero_point is None) == (ref.zero_point is None), name
    if ref.zero_point is not None:
        assert torch.equal(q.zero_point, ref.zero_point), name


@pytest.fixture(scope="module")
def llama_f32(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama_f32"))


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama_bf16"), torch.bfloat16)


@pytest.mark.parametrize("which", ["llama_f32", "llama_bf16"])
def test_bit_identical_to_quantizing_loaded_tensors(which, request, tmp_path):
    src = request.getfixturevalue(which)
    assert len(list(src.glob("model-*.safetensors"))) > 1  # the sharded layout is exercised
    recipe = Recipe(G32, (Rule("lm_head", None), Rule("*.down_proj", INT8_CHANNEL)))
    out, _ = run(src, tmp_path, recipe)
    state = source_state(src)
    _, quantized, kept = read_tensors(out)
    assert set(quantized) | set(kept) == set(state) and not set(quantized) & set(kept)
    for name, q in quantized.items():
        assert_same_qtensor(q, QTensor.quantize(state[name].float(), q.spec), name)
    for name, t in kept.items():
        assert t.dtype == torch.float32 and torch.equal(t, state[name].float()), name
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize(
    "spec",
    [
        G32,
        QuantSpec(3, "asymmetric", "per_group", group_size=16),  # 3 bits: blocks must end on bytes
        INT8_CHANNEL,
        QuantSpec(4, "asymmetric", "per_tensor"),  # two passes: min/max, then codes
        QuantSpec(5, "symmetric", "per_channel", axis=1),  # two passes, a scale per column
        QuantSpec(6, "symmetric", "per_group", axis=0, group_size=4),  # groups down the rows
        pytest.param(
            QuantSpec(4, "asymmetric", "per_group", axis=0, group_size=3),  # a short last group
            marks=pytest.mark.skipif(
                not hasattr(core, "grid_shape"), reason="core needs dividing groups"
            ),
        ),
    ],
    ids=lambda s: s.describe(),
)
def test_blocks_of_rows_give_the_same_bits(spec, llama_bf16, tmp_path, monkeypatch):
    """Weights quantized a block of rows at a time equal the whole-tensor result."""
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 2048)  # 8 rows of 64 floats per block
    reads = []
    read_rows = streaming.read_rows

    def counting_read_rows(fd, t, start, stop):
        reads.append((t.name, start, stop))
        return read_rows(fd, t, start, stop)

    monkeypatch.setattr(streaming, "read_rows", counting_read_rows)
    recipe = Recipe(spec, (), quantize_embeddings=True)
    out, _ = run(llama_bf16, tmp_path, recipe)
    state = source_state(llama_bf16)
    _, quantized, kept = read_tensors(out)
    assert "lm_head.weight" in quantized and "model.embed_tokens.weight" in quantized
    assert len([r for r in reads if r[0] == "model.embed_tokens.weight"]) > 2  # really in blocks
    for name, q in quantized.items():
        assert_same_qtensor(q, QTensor.quantize(state[name].float(), spec), name)
    for name, t in kept.items():
        assert torch.equal(t, state[name].float()), name


def test_recipe_rules(llama_f32, tmp_path):
    recipe = Recipe(G32, (Rule("lm_head", None), Rule("*.down_proj", INT8_CHANNEL)))
    out, manifest = run(llama_f32, tmp_path, recipe)
    q = manifest.quantized
    assert "lm_head.weight" not in q and "model.embed_tokens.weight" not in q
    assert not any(name.endswith("norm.weight") for name in q)
    for layer in range(2):
        p = f"model.layers.{layer}."
        assert q[p + "mlp.down_proj.weight"]["spec"] == INT8_CHANNEL.to_dict()
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj"):
            assert q[p + m + ".weight"]["spec"] == G32.to_dict()
    assert len(q) == 14
    assert manifest.extra == {"recipe": recipe.to_dict(), "method": "rtn", "source": str(llama_f32)}
    assert json.loads((out / MANIFEST).read_text())["method"] == "rtn"

    out2 = tmp_path / "embeddings"
    out2.mkdir()
    with_emb = Recipe(G32, (Rule("lm_head", None),), quantize_embeddings=True)
    m2 = streaming.quantize_checkpoint(llama_f32, out2, with_emb, progress=False)
    assert "model.embed_tokens.weight" in m2.quantized and "lm_head.weight" not in m2.quantized
    assert len(m2.quantized) == 15


def test_manifest_sizes_match_stored_tensors(llama_bf16, tmp_path):
    recipe = Recipe(G32, (Rule("lm_head", None), Rule("*.down_proj", INT8_CHANNEL)))
    out, manifest = run(llama_bf16, tmp_path, recipe, max_shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / INDEX).is_file()
    read, quantized, kept = read_tensors(out)
    assert read.to_dict() == manifest.to_dict()
    state = source_state(llama_bf16)
    assert manifest.quantized_bytes == sum(q.nbytes for q in quantized.values())
    assert manifest.kept_bytes == sum(t.nbytes for t in kept.values())
    assert manifest.quantized_params == sum(q.numel for q in quantized.values())
    assert manifest.kept_params == sum(t.numel() for t in kept.values())
    assert manifest.float_bytes == 4 * sum(t.numel() for t in state.values())  # float32 reference
    total = sum(q.nbytes for q in quantized.values()) + sum(t.nbytes for t in kept.values())
    params = sum(t.numel() for t in state.values())
    assert manifest.bits_per_weight == pytest.approx(8 * total / params)
    # int4 g32 stores a float32 scale per 32 codes: 5 bits; int8 per-channel a bit over 8.
    assert 5.0 < manifest.quantized_bits_per_weight < 8.2
    on_disk = {}
    for f in out.glob("model-*.safetensors"):
        on_disk.update(load_file(f))
    assert sum(t.nbytes for t in on_disk.values()) == manifest.total_bytes


def test_tied_embeddings_checkpoint(tmp_path):
    src = make_llama(tmp_path / "tied", tie=True)
    out, _ = run(src, tmp_path, Recipe(G32))
    _, quantized, kept = read_tensors(out)
    assert "lm_head.weight" not in quantized | kept and "model.embed_tokens.weight" in kept


def test_unknown_architecture(tmp_path):
    src = make_llama(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="no-such-model", architectures=["NoSuchModelForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="NoSuchModelForCausalLM"):
        streaming.quantize_checkpoint(src, out, Recipe(G32), progress=False)
    assert not any(out.iterdir())


def test_missing_config_and_weights(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        streaming.quantize_checkpoint(tmp_path / "empty", out, Recipe(), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        streaming.quantize_checkpoint(tmp_path / "nowhere", out, Recipe(), progress=False)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1)
    config.save_pretrained(tmp_path / "cfg")
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        streaming.quantize_checkpoint(tmp_path / "cfg", out, Recipe(), progress=False)


def test_shape_that_does_not_suit_the_spec_names_the_tensor(llama_f32, tmp_path):
    recipe = Recipe(QuantSpec(8, "symmetric", "per_channel", axis=2))  # weights are 2-D
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\S+\.weight .*axis 2 is out of range"):
        streaming.quantize_checkpoint(llama_f32, out, recipe, progress=False)
    assert not any(out.iterdir())  # checked before anything is written


def test_output_directory_must_be_empty(llama_f32, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        streaming.quantize_checkpoint(llama_f32, tmp_path / "out", Recipe(G32), progress=False)


# --- memory ---------------------------------------------------------------------------------

# Peak RSS of the child: VmHWM, the high-water mark of this process image. (On Linux ru_maxrss
# also carries the RSS the parent had when it forked the child: the pytest process itself.)
CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch
    from zeropoint.modeldir import source, streaming
    from zeropoint.recipe import Recipe
    torch.set_num_threads(2)
    src, out, mode = sys.argv[1:4]
    if mode == "quantize":
        streaming.quantize_checkpoint(src, out, Recipe(), progress=False)
    else:  # the baseline: imports and the meta-device skeleton, no weights
        source.weight_modules(src)
    try:
        with open("/proc/self/status") as f:
            print(next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024)
    except OSError:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)


def write_synthetic_llama(directory: Path, hidden=1024, inter=2816, layers=6, vocab=8000) -> int:
    """A float32 llama-shaped checkpoint of random weights, one shard per two layers."""
    directory.mkdir()
    gen = torch.Generator().manual_seed(0)
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                vocab_size=vocab, num_attention_heads=16, tie_word_embeddings=False
                ).save_pretrained(directory)

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    shards = [{"model.embed_tokens.weight": w(vocab, hidden)}]
    for i in range(layers):
        if i % 2 == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update({
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            **{p + f"self_attn.{m}_proj.weight": w(hidden, hidden) for m in "qkvo"},
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
        })
    shards.append({"model.norm.weight": torch.ones(hidden), "lm_head.weight": w(vocab, hidden)})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.nbytes for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index))
    return total


def children_peak_rss(*arg_lists) -> list[int]:
    """Run one CHILD per argument list, side by side, and return their peak RSS in bytes."""
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for args in arg_lists
    ]
    peaks = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        peaks.append(int(stdout.split()[-1]))
    return peaks


@pytest.fixture
def big_tmp(tmp_path):
    """tmp_path, emptied after the test: pytest keeps old tmp dirs, and these hold ~400 MB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_peak_memory_is_bounded(big_tmp):
    src = big_tmp / "src"
    size = write_synthetic_llama(src)
    assert size > 300e6
    out = big_tmp / "out"
    out.mkdir()
    baseline, peak = children_peak_rss((src, out, "baseline"), (src, out, "quantize"))
    manifest = read_manifest(out)
    assert manifest.quantized_params + manifest.kept_params == size // 4
    # The largest tensor alone (the 33-MB embedding) and the whole checkpoint are far apart:
    # holding the model, or even a whole shard (~100 MB), would break this bound.
    assert peak - baseline < 0.25 * size, (peak, baseline, size)


def test_non_finite_weight_names_tensor_and_rows(tmp_path, monkeypatch):
    src = make_llama(tmp_path / "src")
    shard = next(f for f in sorted(src.glob("model-*.safetensors"))
                 if "model.layers.1.mlp.up_proj.weight" in load_file(f))
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.weight"][100, 3] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 4096)  # 16 rows of 64 floats per block
    out = tmp_path / "out"
    out.mkdir()
    expected = r"model\.layers\.1\.mlp\.up_proj\.weight: rows 96:112: .*NaN"
    with pytest.raises(ValueError, match=expected):
        streaming.quantize_checkpoint(src, out, Recipe(G32), progress=False)


def test_writer_streams_pieces_into_shards(tmp_path):
    """CheckpointWriter.add_kept_chunks: a tensor given in pieces is stored whole; shards stay
    within max_shard_bytes unless one tensor is larger; files read back with safetensors."""
    writer = CheckpointWriter(tmp_path, max_shard_bytes=1000)
    big = torch.arange(600, dtype=torch.float32).reshape(60, 10)  # 2400 bytes: a shard alone
    writer.add_kept("a", torch.arange(5, dtype=torch.int64))
    writer.add_kept_chunks("big", torch.float32, (60, 10), (big[:7], big[7:50], big[50:]))
    writer.add_kept("c", torch.ones(3, 4, dtype=torch.bfloat16))
    manifest = writer.finish()
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert [sorted(load_file(f)) for f in files] == [["a"], ["big"], ["c"]]
    assert not list(tmp_path.glob(".shard-*"))  # spool files are gone
    _, _, kept = read_tensors(tmp_path)
    assert torch.equal(kept["big"], big) and kept["c"].dtype == torch.bfloat16
    assert torch.equal(kept["a"], torch.arange(5))
    assert manifest.kept_bytes == 40 + 2400 + 24 and manifest.kept_params == 5 + 600 + 12

    short = CheckpointWriter(tmp_path / "short")
    (tmp_path / "short").mkdir()
    with pytest.raises(ValueError, match="the pieces hold 40 bytes; shape \\[20\\] .* needs 80"):
        short.add_kept_chunks("x", torch.float32, (20,), (torch.ones(10),))
    short.close()
