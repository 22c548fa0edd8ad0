"""The layout of zeropoint's model directory, and reading one back as tensors.

Layout of a directory that `zeropoint quantize` writes (writer.py):

    zeropoint.json                 manifest: format, version, every quantized tensor's spec, shape
                                   and dtype, the recipe, sizes; see `Manifest`
    model.safetensors              or model-00001-of-0000N.safetensors + model.safetensors.index.json
    config.json, tokenizer files   copied from the source model

A quantized tensor `<module>.weight` is stored as `<module>.weight.packed` (uint8 bit stream),
`<module>.weight.scale` (one per block, in the spec's scale_dtype: float32 or float16) and, for
the asymmetric scheme, `<module>.weight.zero_point` (uint8; with a float zero-point, the block
minimum in the scale's dtype, as qtensor.py says). Every other tensor keeps its name and dtype.
A quantized embedding that is also the output head (tie_word_embeddings) is stored once, under
the embedding's name; loading ties the head to it, as the architecture ties the float weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..qtensor import QTensor

FORMAT = "zeropoint"
FORMAT_VERSION = 1
MANIFEST = "zeropoint.json"
INDEX = "model.safetensors.index.json"
# safetensors dtype names (the header's "dtype" field) of the torch dtypes a checkpoint holds.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _torch_name, _st_name in (
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _torch_name):
        SAFETENSORS_DTYPES[getattr(torch, _torch_name)] = _st_name


@dataclass
class Manifest:
    quantized: dict[str, dict] = field(default_factory=dict)  # tensor name -> QTensor metadata
    float_bytes: int = 0  # size of the source's float weights
    quantized_bytes: int = 0  # bytes of codes + scales + zero-points of quantized tensors
    kept_bytes: int = 0  # bytes of tensors stored as they were
    quantized_params: int = 0
    kept_params: int = 0
    extra: dict = field(default_factory=dict)  # recipe, source, method...

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.kept_bytes

    @property
    def bits_per_weight(self) -> float:
        """Average over every parameter, float ones included."""
        return 8.0 * self.total_bytes / max(1, self.quantized_params + self.kept_params)

    @property
    def quantized_bits_per_weight(self) -> float:
        """Average over the quantized tensors only: codes, scales and zero-points."""
        return 8.0 * self.quantized_bytes / max(1, self.quantized_params)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "quantized": self.quantized,
            "float_bytes": self.float_bytes, "quantized_bytes": self.quantized_bytes,
            "kept_bytes": self.kept_bytes, "quantized_params": self.quantized_params,
            "kept_params": self.kept_params, **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a zeropoint manifest (format {d.get('format')!r})")
        if int(d.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"zeropoint format version {d['version']} is newer than this zeropoint reads "
                f"({FORMAT_VERSION}); upgrade zeropoint"
            )
        known = {"format", "version", "quantized", "float_bytes", "quantized_bytes", "kept_bytes",
                 "quantized_params", "kept_params"}
        return cls(
            d["quantized"], d["float_bytes"], d["quantized_bytes"], d["kept_bytes"],
            d["quantized_params"], d["kept_params"], {k: v for k, v in d.items() if k not in known},
        )


def read_manifest(directory) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a zeropoint model directory (no {MANIFEST})")
    return Manifest.from_dict(json.loads(path.read_text()))


def is_zeropoint_dir(directory) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_tensors(directory) -> tuple[Manifest, dict[str, QTensor], dict[str, torch.Tensor]]:
    """The manifest, the quantized tensors by name and the kept tensors by name."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    quantized = {
        name: QTensor.from_state_dict(raw, meta, name + ".") for name, meta in manifest.quantized.items()
    }
    owned = {name + "." + part for name in quantized for part in ("packed", "scale", "zero_point")}
    kept = {k: v for k, v in raw.items() if k not in owned}
    return manifest, quantized, kept
