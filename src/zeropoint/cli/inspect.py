"""`zeropoint inspect`: what is inside a GGUF file or a zeropoint directory.

The metadata (architecture, context length, vocabulary, file type), every tensor (shape, type or
spec, bytes, bits per weight), the totals by type, the embedding and head's share of the bytes,
and for a GGUF file the tensors whose type differs from its file type's main type, with the
reason llama.cpp's mix rules give (gguf/mixes.py). Reads headers only: no torch, no transformers,
no tensor data, so it is quick on any file.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import CommandError, HelpFormatter, mib, write_json

EPILOG = """examples:
  zeropoint inspect out/smollm2-int4
  zeropoint inspect model.gguf --json model.json
"""

# Tensors that map tokens to vectors (embedding) and vectors to token scores (head).
GGUF_EMBEDDING, GGUF_HEAD = "token_embd.weight", "output.weight"
HF_EMBEDDING, HF_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def add_parser(sub) -> None:
    i = sub.add_parser(
        "inspect", help="show what a GGUF file or a zeropoint directory holds",
        description="Show a GGUF file's or a zeropoint directory's metadata, every tensor\n"
                    "(shape, type or spec, bytes, bits per weight), the totals by type, the\n"
                    "embedding and head's share, and for GGUF the tensors a mix gave another\n"
                    "type. Reads headers only.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    i.add_argument("path", metavar="FILE|DIR", help="a .gguf file or a zeropoint directory")
    i.add_argument("--json", metavar="PATH", help="also write everything shown as JSON")
    i.set_defaults(func=run)


@dataclass
class Tensor:
    name: str
    shape: list[int]
    type: str  # a ggml type, a zeropoint spec ('int4 sym g128') or a float dtype
    bytes: int

    @property
    def weights(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(1, self.weights)


@dataclass
class Report:
    path: str
    format: str  # "gguf" or "zeropoint"
    metadata: dict  # architecture, context_length, vocab_size, file_type, ...
    tensors: list[Tensor]
    size: dict  # file bytes and how they split: header, tensor data, padding
    embedding_and_head: dict = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)  # GGUF only

    def totals(self) -> list[dict]:
        """Per type: tensors, weights, bytes, bits per weight; the largest share first."""
        by_type = defaultdict(lambda: [0, 0, 0])
        for t in self.tensors:
            row = by_type[t.type]
            row[0] += 1
            row[1] += t.weights
            row[2] += t.bytes
        return [{"type": name, "tensors": n, "weights": w, "bytes": b,
                 "bits_per_weight": 8 * b / max(1, w)}
                for name, (n, w, b) in sorted(by_type.items(), key=lambda kv: -kv[1][2])]

    def to_dict(self) -> dict:
        tensors = [asdict(t) | {"weights": t.weights, "bits_per_weight": t.bits_per_weight}
                   for t in self.tensors]
        return {"path": self.path, "format": self.format, "metadata": self.metadata,
                "size": self.size, "tensors": tensors, "totals": self.totals(),
                "embedding_and_head": self.embedding_and_head, "fallbacks": self.fallbacks}


def run(args) -> None:
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{str(path)!r} does not exist; inspect reads a .gguf file or a "
                           "zeropoint directory")
    if path.is_file() and path.suffix.lower() == ".gguf":
        report = _gguf_report(path)
    elif path.is_dir() and (path / "zeropoint.json").is_file():
        report = _zeropoint_report(path)
    else:
        hint = ""
        if path.is_dir() and (path / "config.json").is_file():
            hint = " (this is a Hugging Face checkpoint directory: quantize it first)"
        elif path.is_dir() and any(path.glob("*.gguf")):
            hint = " (it holds .gguf files: pass one of them)"
        raise CommandError(f"{str(path)!r} is neither a .gguf file nor a zeropoint directory"
                           f"{hint}; inspect reads those two")
    _print(report)
    if args.json:
        write_json(args.json, report.to_dict())


# --- GGUF ----------------------------------------------------------------------------------------


def _gguf_report(path: Path) -> Report:
    from ..gguf.reader import read_gguf

    try:
        f = read_gguf(path)
    except ValueError as e:
        raise CommandError(str(e)) from None
    with f:
        arch = f.get("general.architecture")
        tensors = [Tensor(t.name, list(t.shape), t.type, t.nbytes) for t in f.tensors]
        by_name = {t.name: t for t in tensors}
        file_type = f.get("general.file_type")
        vocab = f.get(f"{arch}.vocab_size")
        if vocab is None and GGUF_EMBEDDING in by_name:
            vocab = by_name[GGUF_EMBEDDING].shape[0]  # rows of the embedding: one per token
        tensor_bytes = sum(t.bytes for t in tensors)
        metadata = {
            "architecture": arch, "name": f.get("general.name"),
            "context_length": f.get(f"{arch}.context_length"), "vocab_size": vocab,
            "layers": f.get(f"{arch}.block_count"), "file_type": _file_type_name(file_type),
            "file_type_id": file_type, "gguf_version": f.version,
        }
        size = {"file_bytes": f.file_size, "header_bytes": f.data_offset,
                "tensor_bytes": tensor_bytes,
                "padding_bytes": f.file_size - f.data_offset - tensor_bytes}
        fallbacks = _gguf_fallbacks(f, tensors, file_type)
    return Report(str(path), "gguf", metadata, tensors, size,
                  _embedding_and_head(by_name, GGUF_EMBEDDING, GGUF_HEAD, tensor_bytes),
                  fallbacks)


def _file_type_name(file_type) -> str | None:
    """llama.cpp's name of a general.file_type number ('Q4_K_M'), from gguf-py's table."""
    if file_type is None:
        return None
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"unknown ({file_type})"


def _gguf_fallbacks(f, tensors: list[Tensor], file_type) -> list[dict]:
    """The quantizable tensors whose type is not the file type's main type, each with why: the
    mix's rule for its kind of tensor, a shape its main type's blocks do not tile, or neither
    (a choice llama.cpp's mix would not make: another tool's, or an importance matrix's)."""
    from ..gguf.mixes import MIXES, ModelParams, allows_quantization, parse_target, plan_types

    mix = next((name for name, (ftype, _) in MIXES.items() if ftype == file_type), None)
    if mix is None or not any(allows_quantization(t.name, tuple(t.shape)) for t in tensors):
        return []
    main = MIXES[mix][1]
    try:
        plan = plan_types([(t.name, t.type, tuple(t.shape)) for t in tensors], parse_target(mix),
                          ModelParams.from_metadata(f.metadata))
    except ValueError:
        return []  # a model the ported rules do not cover (mixture of experts, falcon)
    planned = {c.name: c for c in plan.choices}
    found = []
    for t in tensors:
        if t.type == main or not allows_quantization(t.name, tuple(t.shape)):
            continue
        c = planned[t.name]
        reasons = []
        if c.wanted != main:
            reasons.append(f"the {mix} mix gives it {c.wanted}")
        if c.fallback:
            block = _block_size(c.wanted)
            reasons.append(f"rows of {t.shape[-1]} values do not tile {c.wanted}'s blocks of "
                           f"{block}, so {c.type}")
        if c.type != t.type:
            reasons.append(f"not llama.cpp's choice for {mix}, which is {c.type}")
        found.append({"name": t.name, "type": t.type, "main_type": main,
                      "llama_cpp_type": c.type, "reason": "; ".join(reasons)})
    return found


def _block_size(type_name: str) -> int:
    from ..gguf.types import ggml_type

    return ggml_type(type_name).block_size


# --- zeropoint directories -------------------------------------------------------------------


def _zeropoint_report(directory: Path) -> Report:
    from safetensors import SafetensorError, safe_open

    try:
        manifest = json.loads((directory / "zeropoint.json").read_text(encoding="utf-8"))
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"cannot read {str(directory)!r}: {e}") from None
    if manifest.get("format") != "zeropoint" or not isinstance(manifest.get("quantized"), dict):
        raise CommandError(f"{str(directory / 'zeropoint.json')!r} is not a zeropoint manifest")
    shards = sorted(directory.glob("model*.safetensors"))
    if not shards:
        raise CommandError(f"{str(directory)!r} has no model*.safetensors files")
    stored, file_bytes, header_bytes = {}, 0, 0
    for shard in shards:
        try:
            with safe_open(str(shard), framework="numpy") as st:
                for key in st.keys():
                    part = st.get_slice(key)
                    stored[key] = (part.get_shape(), part.get_dtype())
        except (OSError, SafetensorError) as e:
            raise CommandError(f"cannot read {str(shard)!r}: {e}") from None
        size = shard.stat().st_size
        file_bytes += size
        header_bytes += 8 + int.from_bytes(shard.open("rb").read(8), "little")
    tensors = _zeropoint_tensors(manifest, stored)
    tensor_bytes = sum(t.bytes for t in tensors)
    by_name = {t.name: t for t in tensors}
    metadata = {
        "architecture": config.get("model_type"),
        "architectures": config.get("architectures"),
        "context_length": config.get("max_position_embeddings"),
        "vocab_size": config.get("vocab_size"),
        "layers": config.get("num_hidden_layers"),
        "file_type": _recipe_text(manifest),
        "method": manifest.get("method"), "source": manifest.get("source"),
    }
    size = {"file_bytes": file_bytes, "header_bytes": header_bytes, "tensor_bytes": tensor_bytes,
            "padding_bytes": file_bytes - header_bytes - tensor_bytes, "shards": len(shards)}
    return Report(str(directory), "zeropoint", metadata, tensors, size,
                  _embedding_and_head(by_name, HF_EMBEDDING, HF_HEAD, tensor_bytes))


_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_PARTS = ("packed", "scale", "zero_point")  # a quantized tensor's stored parts (modeldir/format)


def _zeropoint_tensors(manifest: dict, stored: dict) -> list[Tensor]:
    """The model's tensors: each quantized one with its parts' bytes summed under its spec, and
    each kept one as stored."""
    def nbytes(key):
        shape, dtype = stored[key]
        return math.prod(shape) * _ST_BYTES.get(dtype.upper(), 1)

    tensors, owned = [], set()
    for name, meta in manifest["quantized"].items():
        parts = [f"{name}.{p}" for p in _PARTS if f"{name}.{p}" in stored]
        if f"{name}.packed" not in stored:
            raise CommandError(f"the manifest names {name!r}, whose codes ({name}.packed) are "
                               "in no safetensors file; the directory is incomplete")
        owned.update(parts)
        tensors.append(Tensor(name, list(meta["shape"]), _spec_text(meta["spec"]),
                              sum(nbytes(k) for k in parts)))
    for key, (shape, dtype) in stored.items():
        if key not in owned:
            tensors.append(Tensor(key, list(shape), dtype, nbytes(key)))
    return tensors


def _spec_text(spec: dict) -> str:
    from ..spec import QuantSpec

    return QuantSpec.from_dict(spec).describe()


def _recipe_text(manifest: dict) -> str:
    recipe = manifest.get("recipe") or {}
    default = recipe.get("default")
    text = _spec_text(default) if default else "float"
    kept = [r["pattern"] for r in recipe.get("rules", []) if r.get("spec") is None]
    if kept:
        text += f", float: {', '.join(kept)}"
    return text


# --- shared ------------------------------------------------------------------------------------


def _embedding_and_head(by_name: dict, embedding: str, head: str, total: int) -> dict:
    """Bytes and share of the embedding and the head; tied when the model has no head tensor
    (the embedding doubles as the head)."""
    out = {"tied": head not in by_name, "bytes": 0, "share": 0.0}
    for role, name in (("embedding", embedding), ("head", head)):
        t = by_name.get(name)
        if t is not None:
            out[role] = {"name": name, "type": t.type, "bytes": t.bytes}
            out["bytes"] += t.bytes
    out["share"] = out["bytes"] / max(1, total)
    return out


def _print(r: Report) -> None:
    m = r.metadata
    print(f"{r.path}: {'GGUF file' if r.format == 'gguf' else 'zeropoint directory'}, "
          f"{mib(r.size['file_bytes'])}")
    for key, label in (("architecture", "architecture"), ("name", "name"),
                       ("context_length", "context length"), ("vocab_size", "vocabulary"),
                       ("layers", "layers"), ("file_type", "file type"), ("method", "method")):
        if m.get(key) is not None:
            print(f"  {label:<15} {m[key]}")
    weights = sum(t.weights for t in r.tensors)
    tensor_bytes = r.size["tensor_bytes"]
    print(f"  {'tensors':<15} {len(r.tensors)}, {weights:,} weights, {mib(tensor_bytes)}, "
          f"{8 * tensor_bytes / max(1, weights):.3f} bits/weight")
    print(f"  {'file bytes':<15} {r.size['file_bytes']:,} = header {r.size['header_bytes']:,} + "
          f"tensors {tensor_bytes:,} + padding {r.size['padding_bytes']:,}")
    width = max([len("name")] + [len(t.name) for t in r.tensors])
    type_width = max([len("type")] + [len(t.type) for t in r.tensors])
    print(f"\n{'name':<{width}}  {'shape':<14} {'type':<{type_width}} {'bytes':>12} "
          f"{'bits/weight':>11}")
    for t in r.tensors:
        shape = "x".join(str(s) for s in t.shape)
        print(f"{t.name:<{width}}  {shape:<14} {t.type:<{type_width}} {t.bytes:>12,} "
              f"{t.bits_per_weight:>11.3f}")
    print(f"\ntotals by type\n{'type':<{type_width}} {'tensors':>8} {'weights':>14} "
          f"{'bytes':>14} {'share':>7} {'bits/weight':>11}")
    for row in r.totals():
        print(f"{row['type']:<{type_width}} {row['tensors']:>8} {row['weights']:>14,} "
              f"{row['bytes']:>14,} {row['bytes'] / max(1, tensor_bytes):>7.1%} "
              f"{row['bits_per_weight']:>11.3f}")
    e = r.embedding_and_head
    parts = [f"{e[role]['name']} {e[role]['type']} {mib(e[role]['bytes'])}"
             for role in ("embedding", "head") if role in e]
    tied = "; tied: the embedding is also the head" if e["tied"] else ""
    print(f"\nembedding and head: {e['share']:.1%} of the tensor bytes "
          f"({', '.join(parts) or 'none'}){tied}")
    if r.format == "gguf" and r.fallbacks:
        main = r.fallbacks[0]["main_type"]
        n = len(r.fallbacks)
        print(f"\n{n} tensor{'s are' if n > 1 else ' is'} not {main}, the main type of file "
              f"type {m['file_type']}:")
        for fb in r.fallbacks:
            print(f"  {fb['name']:<{width}} {fb['type']:<8} {fb['reason']}")
