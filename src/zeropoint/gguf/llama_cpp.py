"""llama.cpp's runtime, through llama-cpp-python: open a GGUF file, score its perplexity, generate
text, and quantize with llama.cpp's own quantizer (the reference zeropoint's files are tested and
benchmarked against). llama_cpp is imported only inside the functions that need it.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .mixes import MIXES, PURE_TYPES
from .reader import read_gguf

DEFAULT_PROMPT = "The three primary colors are"


@dataclass(frozen=True)
class LlamaCppPerplexity:
    perplexity: float
    nll: float
    tokens: int  # predicted (scored) tokens


def open_llama(path, n_ctx: int = 512, threads: int = 2, logits_all: bool = True):
    """llama_cpp.Llama for the GGUF file at `path`, quiet. ValueError for a bad file.

    On CPUs with AMX, llama.cpp's AMX matmul (one of its extra buffer types) segfaulted on every
    quantized model on the machine zeropoint was built on (a sandbox that does not grant AMX tile
    state), so extra buffers are off there unless ZEROPOINT_LLAMA_EXTRA_BUFFERS=1. Plain ggml
    kernels compute the same dot products, a little slower.
    """
    from llama_cpp import Llama

    path = Path(path)
    read_gguf(path)  # a clear error for a bad file, before llama.cpp's terse one
    try:
        with _extra_buffers(extra_buffers_enabled()):
            return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                         n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                         verbose=False)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"llama.cpp cannot load {str(path)!r}: {e}") from None


def extra_buffers_enabled() -> bool:
    """Whether llama.cpp may use its extra weight buffers (see open_llama): not on AMX CPUs,
    unless ZEROPOINT_LLAMA_EXTRA_BUFFERS=1 (or =0 to turn them off anywhere)."""
    env = os.environ.get("ZEROPOINT_LLAMA_EXTRA_BUFFERS")
    return env == "1" if env in ("0", "1") else not _amx_cpu()


def _amx_cpu() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@contextmanager
def _extra_buffers(enabled: bool):
    """llama-cpp-python's Llama() has no switch for llama.cpp's extra weight buffers (AMX tiles,
    repacked layouts); this sets the model-params default it starts from while inside."""
    import llama_cpp.llama_cpp as lc

    original = lc.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = enabled
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = original


def llama_cpp_perplexity(
    path, text: str, window: int = 512, max_tokens: int = 2048, threads: int = 2, llm=None
) -> LlamaCppPerplexity:
    """Perplexity of the GGUF model at `path` under llama.cpp, by models.evaluate.perplexity's
    protocol (first max_tokens tokens, independent windows, first token of each window
    unscored), with llama.cpp's tokenizer (no BOS) and logits."""
    import torch
    import torch.nn.functional as F

    if window < 2 or max_tokens < 2:
        raise ValueError(f"window and max_tokens must be at least 2, got {window}, {max_tokens}")
    llm = llm or open_llama(path, window, threads, logits_all=True)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} token(s); perplexity needs at least 2")
    total, predicted = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = torch.from_numpy(llm.scores[: len(chunk) - 1].copy()).float()  # (n - 1, vocab)
        total += F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        predicted += len(chunk) - 1
    nll = total / predicted
    return LlamaCppPerplexity(math.exp(nll), nll, predicted)


def llama_cpp_generate(llm, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 16) -> str:
    """Greedy continuation of `prompt` by llama.cpp."""
    out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def gguf_size(path) -> tuple[int, float]:
    """(file bytes, bits per weight as llama.cpp reports it: tensor bytes * 8 / weights)."""
    f = read_gguf(path)
    return f.file_size, 8 * sum(t.nbytes for t in f.tensors) / sum(t.n_elements for t in f.tensors)


def llama_cpp_quantize(src: str | Path, dst: str | Path, target: str, nthread: int = 2,
                       dry_run: bool = False) -> str:
    """Quantize `src` to `dst` with llama.cpp's own llama_model_quantize (through llama-cpp-python)
    for a mix name or a pure type; returns llama.cpp's log. The peer zeropoint is tested and
    benchmarked against. Requantizing from quantized types is allowed. `dry_run` writes nothing:
    the log still names every tensor's type and every fallback."""
    import ctypes

    import llama_cpp

    key = target.upper()
    if key in MIXES:
        ftype, pure = MIXES[key][0], False
    elif key in PURE_TYPES:
        ftype, pure = PURE_TYPES[key], True
    else:
        raise ValueError(f"llama_cpp_quantize takes a mix or a pure type, got {target!r}")
    read_gguf(src)  # llama.cpp's own parser trusts the header: a hostile file stops here
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    params.allow_requantize = True
    params.pure = pure
    params.dry_run = dry_run
    # A Llama(verbose=False) made earlier in the process turns llama-cpp-python's log callback
    # down to errors; the per-tensor log is the answer here, so turn it up for this call.
    from llama_cpp._logger import logger, set_verbose

    level = logger.level
    set_verbose(True)
    try:
        with _captured_stderr() as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                                ctypes.byref(params))
    finally:
        logger.setLevel(level)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {target}) failed ({rc}): "
                           f"{log.text[-2000:]}")
    return log.text


class _captured_stderr:
    """Catch what llama.cpp logs while inside: its C code writes to file descriptor 2, and
    llama-cpp-python's log callback prints to Python's sys.stderr (which a test runner may have
    replaced); both are redirected, and `text` holds the two after exit."""

    def __enter__(self):
        import io
        import sys
        import tempfile

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self._py, self._sys_stderr = io.StringIO(), sys.stderr
        sys.stderr = self._py
        self.text = ""
        return self

    def __exit__(self, *exc):
        import sys

        sys.stderr = self._sys_stderr
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace") + self._py.getvalue()
        self._file.close()


class LlamaCppDecoder:
    """One sequence through llama.cpp, token ids in, last logits out (the decoder that
    nn.generate.stream_tokens drives): llama.cpp runs the model, zeropoint's Sampler chooses the
    tokens. Its tokenizer, chat template and end-of-generation tokens are llama.cpp's."""

    engine = "llama.cpp"

    def __init__(self, path, n_ctx: int, threads: int = 2):
        self.llm = open_llama(path, n_ctx=n_ctx, threads=threads, logits_all=False)
        self.n_ctx, self.n_vocab = self.llm.n_ctx(), self.llm.n_vocab()

    def start(self, length: int) -> None:
        if length > self.n_ctx:
            raise ValueError(f"{length} tokens (prompt and new tokens) exceed the context of "
                             f"{self.n_ctx} that llama.cpp was opened with")
        self.llm.reset()  # the next eval drops the cache past position 0

    def feed(self, ids: list[int]):
        """The (vocab,) float32 logits (a torch tensor) after `ids`."""
        import ctypes

        import llama_cpp
        import numpy as np
        import torch

        self.llm.eval(ids)
        # Llama.eval keeps no logits unless every row's are kept (logits_all); the last row is
        # all generation needs, and llama.cpp still holds it.
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        array = np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)),
                                      shape=(self.n_vocab,))
        return torch.from_numpy(array.copy())

    # The text side, in llama.cpp's own tokenizer.
    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`: a BOS first where the model asks for one; with special=True, the
        text of special tokens (a rendered chat template) tokenized as those tokens, no BOS."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=not special, special=special)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, control tokens left out; an incomplete UTF-8 tail shows as U+FFFD."""
        return self.llm.detokenize(ids).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    @property
    def bos_token(self) -> int:
        return self.llm.token_bos()

    @property
    def eos_token(self) -> int:
        return self.llm.token_eos()

    def is_end(self, token: int) -> bool:
        """Whether `token` ends a generation (end of sequence, of turn, ...), as llama.cpp says."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self.llm.model),
                                                 token))

    def close(self) -> None:
        self.llm.close()
