"""Round-to-nearest quantization of a Hugging Face safetensors checkpoint, tensor by tensor.

`quantize_checkpoint` turns a checkpoint directory into a zeropoint model directory (the layout of
format.py) without ever loading the float model: the module types come from a skeleton
built on the meta device (no weights), and the weights are read from the safetensors files one
block of rows at a time. The result is bit for bit what quantizing the model loaded in float32
gives: every weight is converted to float32 before it is quantized, and round-to-nearest with
min/max ranges is the same arithmetic whether a tensor is seen whole or a block of rows at a time.

Memory model (what the process holds at most, beyond Python, torch and transformers themselves):

- Reading: tensor bytes are read with `os.pread` into buffers of our own, never through a
  memory map (source.py says why). The page cache the reads fill is the kernel's, not ours.
- Working set: one block of rows of about `CHUNK_BYTES` in float32, plus the source-dtype buffer
  it came from (bf16/fp16 sources) and the quantizer's codes (a quarter of it) and packed bytes.
  A weight larger than a block is quantized block by block: per-channel and per-group scales of
  different rows are independent, and the packed bit streams of blocks concatenate exactly when
  each block's codes fill whole bytes (block heights are chosen so they do). Per-tensor specs and
  per-channel specs along the columns take two passes: min/max block by block, then codes.
  Groups that run down the rows (per-group, axis 0) never straddle two blocks.
- The quantized tensor being built: its packed codes, scales and zero-points (1/8 of its float32
  size at 4 bits, 1/4 at 8 bits), until the writer has it.
- Kept (float) tensors go to the writer block by block (`CheckpointWriter.add_kept_chunks`),
  so a 512-MB embedding never sits in memory whole.
- The writer streams every tensor to disk as it arrives (`CheckpointWriter`): `max_shard_bytes`
  sizes the output files, not the memory.

So the peak is about the import baseline + 2-3 x CHUNK_BYTES + the largest quantized tensor's
packed form, whatever the size of the checkpoint. benchmarks/bench_streaming.py measures it: on
a 5.1-GB float32 llama-shaped checkpoint, 512 MiB peak RSS, 161 MiB above the 351 MiB that
importing torch and transformers and building the meta skeleton take by themselves.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from math import lcm
from pathlib import Path

import torch

from .. import core
from ..packing import packed_nbytes, rows_per_whole_bytes
from ..qtensor import QTensor
from ..recipe import Recipe
from ..spec import Granularity, QuantSpec
from .format import Manifest
from .source import SourceTensor, read_rows, source_tensors, weight_modules
from .writer import DEFAULT_SHARD_BYTES, CheckpointWriter

# float32 bytes of one block of rows: large enough that per-block overhead vanishes, small
# enough that the working set stays a small part of the memory budget.
CHUNK_BYTES = 32 << 20
# Files copied beside the weights when the source has them: what loading the model needs.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.txt", "merges.txt", "vocab.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def quantize_checkpoint(
    src_dir,
    out_dir,
    recipe: Recipe,
    *,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Manifest:
    """Quantize the Hugging Face checkpoint in `src_dir` with round-to-nearest into `out_dir`.

    src_dir: config.json plus model.safetensors, or sharded model-*.safetensors with
    model.safetensors.index.json. out_dir: an existing empty directory; the caller renames it
    into place. The weights of the nn.Linear and nn.Embedding modules that `recipe.spec_for`
    gives a spec are quantized from float32; every other floating tensor is stored as float32,
    other tensors as they are. config.json, generation_config.json and the tokenizer files are
    copied. Returns the manifest written to out_dir/zeropoint.json. Memory stays bounded whatever
    the checkpoint's size: see the module docstring.

    Raises ValueError for a directory that is not a safetensors checkpoint, an architecture that
    transformers cannot build, or a weight whose shape does not suit its spec (checked for every
    tensor before anything is written).
    """
    if sys.byteorder != "little":
        raise ValueError("safetensors files are little-endian; this machine is big-endian")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"output directory {str(out_dir)!r} does not exist; create it first")
    if any(out_dir.iterdir()):
        raise ValueError(f"output directory {str(out_dir)!r} is not empty")
    tensors = source_tensors(src_dir)
    modules, prefix = weight_modules(src_dir)
    plan = _plan(tensors, modules, prefix, recipe)

    from tqdm.auto import tqdm

    writer = CheckpointWriter(out_dir, max_shard_bytes)
    fds: dict[Path, int] = {}
    try:
        with tqdm(total=len(plan), unit="tensor", desc="quantize", disable=not progress) as bar:
            for t, spec in plan:
                bar.set_postfix_str(t.name, refresh=False)
                if t.path not in fds:
                    for fd in fds.values():  # files are visited in turn: one open at a time
                        os.close(fd)
                    fds = {t.path: os.open(t.path, os.O_RDONLY)}
                fd = fds[t.path]
                if spec is not None:
                    q = _quantize_tensor(fd, t, spec)
                    writer.add_quantized(t.name, q, source_bytes=t.numel * 4)
                    del q
                else:
                    dtype = torch.float32 if t.dtype.is_floating_point else t.dtype
                    writer.add_kept_chunks(t.name, dtype, t.shape, _kept_blocks(fd, t, dtype))
                bar.update()
    except BaseException:
        writer.close()
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    for name in AUX_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
    return writer.finish(recipe=recipe.to_dict(), method="rtn", source=str(src_dir))


def _module_of(tensor: str, modules: dict[str, str], prefix: str) -> str | None:
    """The Linear/Embedding module whose weight `tensor` is, allowing for a checkpoint saved
    with or without the base model's prefix (`bert.`, `model.`)."""
    if not tensor.endswith(".weight"):
        return None
    name = tensor.removesuffix(".weight")
    candidates = [name]
    if prefix:
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        else:
            candidates.append(f"{prefix}.{name}")
    return next((c for c in candidates if c in modules), None)


def _plan(tensors, modules, prefix, recipe: Recipe) -> list[tuple[SourceTensor, QuantSpec | None]]:
    """Each tensor with its spec (None: keep), every shape checked against its spec up front."""
    plan = []
    for t in tensors:
        module = _module_of(t.name, modules, prefix)
        spec = None if module is None else recipe.spec_for(module, modules[module])
        if spec is not None:
            if not t.dtype.is_floating_point:
                raise ValueError(f"cannot quantize {t.name}: its dtype is {t.dtype}, not a float")
            try:
                spec.block_size(t.shape)
            except ValueError as e:
                raise ValueError(
                    f"cannot quantize {t.name} (shape {list(t.shape)}) with {spec.describe()}: {e}"
                ) from None
        plan.append((t, spec))
    return plan


# --- block by block ----------------------------------------------------------------------------


def _block_rows(t: SourceTensor, spec: QuantSpec | None) -> int:
    """Rows per block for `t`: about CHUNK_BYTES of float32, a multiple of the spec's block
    height, and whole bytes of packed codes. Returns t.rows when the tensor is done whole."""
    step = max(1, CHUNK_BYTES // (4 * max(1, t.row_numel)))
    if spec is None or len(t.shape) < 2:
        return min(step, t.rows) if spec is None else t.rows
    height = spec.block_size(t.shape)[0]
    unit = rows_per_whole_bytes(t.row_numel, spec.bits)
    if height < t.rows:
        unit = lcm(unit, height)
    elif spec.granularity is Granularity.PER_GROUP:
        return t.rows  # one group spans every row: no split keeps the groups whole
    return min(t.rows, max(unit, step // unit * unit))


def _blocks(t: SourceTensor, rows: int):
    for start in range(0, t.rows, max(1, rows)):
        yield start, min(start + rows, t.rows)


def _kept_blocks(fd: int, t: SourceTensor, dtype: torch.dtype):
    for start, stop in _blocks(t, _block_rows(t, None)):
        yield read_rows(fd, t, start, stop).to(dtype)


def _quantize_tensor(fd: int, t: SourceTensor, spec: QuantSpec) -> QTensor:
    """QTensor.quantize(the float32 tensor, spec), bit for bit, read a block of rows at a time."""
    rows = _block_rows(t, spec)
    try:
        if rows >= t.rows:
            return QTensor.quantize(read_rows(fd, t, 0, t.rows).float(), spec)
        height = spec.block_size(t.shape)[0]
        if height < t.rows:
            return _quantize_independent(fd, t, spec, rows, height)
        return _quantize_two_pass(fd, t, spec, rows)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{t.name}: {e}") from e


@contextmanager
def _rows_named(start: int, stop: int):
    """Say which rows an error is about: the quantizer's indices are relative to the block."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"rows {start}:{stop}: {e}") from e


def _quantize_independent(fd, t: SourceTensor, spec: QuantSpec, rows: int, height: int) -> QTensor:
    # Blocks of rows share no scale: quantize each on its own and place its pieces.
    grid = tuple(-(-n // b) for n, b in zip(t.shape, spec.block_size(t.shape)))  # ceil: a last
    # group shorter than group_size still has its own scale
    packed = torch.empty(packed_nbytes(t.numel, spec.bits), dtype=torch.uint8)
    scale = torch.empty(grid, dtype=torch.float32)
    zero_point = None if spec.symmetric else torch.empty(
        grid, dtype=torch.float32 if spec.float_zero_point else torch.uint8)
    for start, stop in _blocks(t, rows):
        with _rows_named(start, stop):
            q = QTensor.quantize(read_rows(fd, t, start, stop).float(), spec)
        at = packed_nbytes(start * t.row_numel, spec.bits)  # whole bytes: see _block_rows
        packed[at : at + q.packed.numel()] = q.packed
        g = start // height  # blocks start on a group boundary: see _block_rows
        scale[g : g + q.scale.shape[0]] = q.scale
        if zero_point is not None:
            zero_point[g : g + q.scale.shape[0]] = q.zero_point
    return QTensor(packed, scale, zero_point, spec, t.shape, torch.float32)


def _quantize_two_pass(fd, t: SourceTensor, spec: QuantSpec, rows: int) -> QTensor:
    # One scale spans every row (per-tensor, or per-channel along the columns): min/max is exact
    # block by block, then every block is quantized with the whole tensor's qparams.
    lo = hi = None
    for start, stop in _blocks(t, rows):
        with _rows_named(start, stop):
            b_lo, b_hi = core.block_min_max(read_rows(fd, t, start, stop).float(), spec)
        lo = b_lo if lo is None else torch.minimum(lo, b_lo)
        hi = b_hi if hi is None else torch.maximum(hi, b_hi)
    scale, zero_point = core.qparams_from_range(lo, hi, spec)
    packed = torch.empty(packed_nbytes(t.numel, spec.bits), dtype=torch.uint8)
    q = None
    for start, stop in _blocks(t, rows):
        x = read_rows(fd, t, start, stop).float()
        codes = core.quantize(x, spec, scale, zero_point)
        q = QTensor.from_codes(codes, spec, scale, zero_point, torch.float32)
        at = packed_nbytes(start * t.row_numel, spec.bits)
        packed[at : at + q.packed.numel()] = q.packed
    return QTensor(packed, q.scale, q.zero_point, spec, t.shape, torch.float32)
