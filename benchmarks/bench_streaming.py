"""Peak memory of streaming round-to-nearest quantization of a checkpoint larger than the budget.

Writes a synthetic float32 llama-shaped checkpoint (default: hidden 4096, intermediate 11008,
5 layers, vocab 32000: 5.1 GB in shards of about 1 GB, with config.json and index), quantizes it
to 4-bit symmetric group-128 with `zeropoint.modeldir.streaming.quantize_checkpoint` in a child
process, and prints the sizes, the time and the child's peak RSS against the target: under 1 GB
and under 25% of the checkpoint. Two more children give the baseline: one that only imports torch and
zeropoint, one that also builds the model skeleton on the meta device (what quantize_checkpoint
does before it reads a weight). With --peer, a last child does the same work in memory:
transformers from_pretrained in float32, then zeropoint.nn.quantize_model with the same recipe.

Peak RSS is the child's VmHWM (/proc/<pid>/status), the high-water mark of its own process image.
(ru_maxrss of a child also carries what the parent had resident when it forked.)

    python benchmarks/bench_streaming.py [--dir /tmp] [--keep] [--layers 5] [--peer]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from math import prod
from pathlib import Path

import torch

GB = 1e9
MiB = 1 << 20
BLOCK_ELEMENTS = 16 << 20  # random data is made and written 64 MB at a time

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(2)
from zeropoint.modeldir import source, streaming
mode, src, out = sys.argv[1:4]
result = {}
from zeropoint.recipe import Recipe, Rule
from zeropoint.spec import QuantSpec
recipe = Recipe(QuantSpec(4, "symmetric", "per_group", group_size=128), (Rule("lm_head", None),))
if mode == "quantize":
    t = time.perf_counter()
    m = streaming.quantize_checkpoint(src, out, recipe, progress=False)
    result.update(wall=time.perf_counter() - t, total_bytes=m.total_bytes,
                  float_bytes=m.float_bytes, bpw=m.bits_per_weight,
                  qbpw=m.quantized_bits_per_weight, quantized=len(m.quantized))
elif mode == "skeleton":
    source.weight_modules(src)
elif mode == "peer":
    from transformers import AutoModelForCausalLM
    from zeropoint.nn.quantize_model import quantize_model
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    quantize_model(model, recipe)
    result.update(wall=time.perf_counter() - t)
with open("/proc/self/status") as f:
    result["peak"] = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024
result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(result))
"""


def llama_tensors(hidden: int, inter: int, layers: int, vocab: int):
    """(name, shape) of a llama checkpoint, in the order transformers saves them."""
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        for m in "qkvo":
            yield p + f"self_attn.{m}_proj.weight", (hidden, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_shard(path: Path, tensors, gen: torch.Generator) -> None:
    """A float32 safetensors file written tensor by tensor, 64 MB at a time: the header first
    (every shape is known), then random weights (norms are ones)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = 4 * prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            left = prod(shape)
            while left:
                n = min(left, BLOCK_ELEMENTS)
                block = torch.ones(n) if len(shape) == 1 else torch.randn(n, generator=gen) * 0.02
                f.write(memoryview(block.numpy()))
                left -= n


def make_checkpoint(directory: Path, hidden, inter, layers, vocab, shard_bytes) -> int:
    from transformers import LlamaConfig

    directory.mkdir(parents=True)
    LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
        num_attention_heads=hidden // 128, tie_word_embeddings=False,
    ).save_pretrained(directory)
    shards, size = [[]], 0
    for name, shape in llama_tensors(hidden, inter, layers, vocab):
        nbytes = 4 * prod(shape)
        if shards[-1] and sum(4 * prod(s) for _, s in shards[-1]) + nbytes > shard_bytes:
            shards.append([])
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"  writing {name} ({sum(4 * prod(s) for _, s in tensors) / GB:.2f} GB)", flush=True)
        write_shard(directory / name, tensors, gen)
        weight_map.update(dict.fromkeys((n for n, _ in tensors), name))
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return size


def run_child(mode: str, src: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{mode} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the checkpoint and the output go (default: the temp dir)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the synthetic checkpoint (and reuse one already there)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--peer", action="store_true",
                    help="also quantize in memory: from_pretrained + quantize_model "
                    "(needs the checkpoint's size in RAM)")
    args = ap.parse_args()

    shape_tag = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    src = args.dir / f"zeropoint-bench-streaming-{shape_tag}"
    work = Path(tempfile.mkdtemp(prefix="zeropoint-bench-out-", dir=args.dir))
    made = False
    try:
        if args.keep and (src / "model.safetensors.index.json").is_file():
            index = json.loads((src / "model.safetensors.index.json").read_text())
            size = index["metadata"]["total_size"]
            print(f"reusing {src}")
        else:
            if src.exists():
                shutil.rmtree(src)
            print(f"writing a synthetic float32 checkpoint to {src}")
            t = time.perf_counter()
            made = True
            size = make_checkpoint(src, args.hidden, args.intermediate, args.layers, args.vocab,
                                   int(args.shard_gb * GB))
            print(f"  {size / GB:.2f} GB in {time.perf_counter() - t:.0f} s")
        n_shards = len(list(src.glob("model-*.safetensors")))

        imports = run_child("imports", src, work)
        skeleton = run_child("skeleton", src, work)
        out = work / "out"
        out.mkdir()
        q = run_child("quantize", src, out)
        peer = run_child("peer", src, work) if args.peer else None
        out_size = dir_bytes(out)

        peak, ratio = q["peak"], q["peak"] / size
        ok = peak < GB and ratio < 0.25
        print()
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, 2 threads")
        print(f"checkpoint        {size / GB:8.2f} GB  float32, {n_shards} shards, {shape_tag}")
        print(f"output            {out_size / GB:8.2f} GB  int4 sym g128, lm_head and embeddings "
              f"kept in float32 ({q['quantized']} tensors quantized)")
        print(f"bits per weight   {q['bpw']:8.2f}     all parameters; {q['qbpw']:.3f} over the "
              f"quantized ones")
        print(f"wall time         {q['wall']:8.1f} s   "
              f"{size / GB / q['wall']:.2f} GB/s of checkpoint")
        print(f"baseline RSS      {imports['peak'] / MiB:8.0f} MiB imports torch + zeropoint only")
        print(f"                  {skeleton['peak'] / MiB:8.0f} MiB + transformers and the "
              "meta-device skeleton")
        print(f"peak RSS          {peak / MiB:8.0f} MiB ({peak / GB:.3f} GB), "
              f"{(peak - skeleton['peak']) / MiB:.0f} MiB above the skeleton baseline")
        print(f"RSS / checkpoint  {100 * ratio:8.1f} %")
        if peer is not None:
            print(f"peer (in memory)  {peer['peak'] / MiB:8.0f} MiB peak RSS, "
                  f"{peer['wall']:.1f} s: from_pretrained float32 + quantize_model; "
                  f"streaming/peer RSS {peak / peer['peak']:.2f}x")
        print(f"target: peak RSS < 1 GB and < 25% of the checkpoint: {'PASS' if ok else 'FAIL'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep and (made or src.exists()):
            shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
