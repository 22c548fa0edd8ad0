"""The base model's next-token distributions, kept compact so they are computed once and reused
by every `eval --kld` against that base.

llama-perplexity's base-logits file stores every vocabulary entry of every scored token as a
16-bit log-probability (about 98 KB a token for a 49k vocabulary). This file keeps, per scored
token:

- the `top_k` largest log-probabilities (float32) and their token ids (int32), most likely first;
- the log of the mass T outside them, computed from the full row (not by subtraction, so a tail
  of 1e-12 keeps its digits);
- `tail_samples` tokens drawn from the tail by systematic sampling: the tail's cumulative
  distribution (in vocabulary order) cut into equal strata, the token at each stratum's middle
  (ids and log-probabilities), so a token holding a share w of the tail is drawn s * w times,
  rounded down or up;
- -ln p(right next token), which perplexity and Δp need whatever the token's rank.

8 * (top_k + tail_samples) + 8 bytes a token: 1.5 KB with the defaults (64 + 128), some 65
times smaller than llama.cpp's file for SmolLM2 and 340 times for Gemma 3's 262k vocabulary.

Why the sample: KL(p || q) = sum_head p ln(p/q) + T * E_{i ~ tail}[ln(p_i / q_i)]. The head is
exact. The tail matters: a small model's top 64 tokens often leave 10-20% of the mass outside,
and lumping that mass into one outcome (T ln(T/Q)) understates SmolLM2's mean KLD by 0.05, four
times llama-perplexity's own uncertainty on 1k tokens. The stratified sample estimates the
tail's expectation with a per-token error of about 0.007 nats; on the mean, -8e-5 (torch's
logits) and +1.3e-3 (llama.cpp's) against a KLD of 0.350 ± 0.018 over 510 tokens
(tests/models/test_kld_real.py measures it against the full-vocabulary KLD).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_path

if TYPE_CHECKING:  # torch loads only with the functions that compute (eval --help needs none)
    import torch

FORMAT = "zeropoint-base-logits"
VERSION = 1
DEFAULT_TOP_K = 64
DEFAULT_TAIL_SAMPLES = 128


class BaseLogitsMismatch(ValueError):
    """A base-logits file that does not belong to this evaluation (other text, window, model
    or tokens)."""


@dataclass(frozen=True)
class BaseLogitsHeader:
    model: str  # the base model it was computed from, as given (resolved path)
    engine: str  # "torch" or "llama.cpp"
    text_sha256: str  # of the evaluation text's UTF-8 bytes
    window: int  # tokens per chunk (llama-perplexity's n_ctx)
    chunks: int
    vocab_size: int
    top_k: int
    tail_samples: int
    add_bos: bool  # whether each chunk's first token was replaced by BOS when it was run

    @property
    def scored_per_chunk(self) -> int:
        return scored_per_chunk(self.window)


@dataclass
class CompactRows:
    """Per scored token (rows); torch tensors or numpy arrays."""

    top_ids: Any  # (rows, top_k) int32, most likely first
    top_log_probs: Any  # (rows, top_k) float32, descending
    tail_log_mass: Any  # (rows,) float32: ln of the probability outside the top-k
    tail_ids: Any  # (rows, tail_samples) int32: the systematic sample of the tail
    tail_log_probs: Any  # (rows, tail_samples) float32
    nll: Any  # (rows,) float32: -ln p(right next token)

    def __getitem__(self, rows: slice) -> CompactRows:
        return CompactRows(**{k: _tensor(v[rows]) for k, v in vars(self).items()})

    @staticmethod
    def concatenate(parts: list[CompactRows]) -> CompactRows:
        import torch

        return CompactRows(**{k: torch.cat([getattr(p, k) for p in parts]).numpy()
                              for k in ROW_FIELDS})


ROW_FIELDS = ("top_ids", "top_log_probs", "tail_log_mass", "tail_ids", "tail_log_probs", "nll")


@dataclass
class BaseLogits:
    header: BaseLogitsHeader
    tokens: np.ndarray  # (chunks, window) int32: the text's tokens, before any BOS replacement
    rows: CompactRows  # numpy arrays, (chunks * scored_per_chunk) rows

    def nbytes(self) -> int:
        return self.tokens.nbytes + sum(getattr(self.rows, k).nbytes for k in ROW_FIELDS)


def _tensor(a) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a


def scored_per_chunk(window: int) -> int:
    """Tokens scored in each chunk: llama-perplexity scores only the second half of a chunk (so
    every prediction has at least window/2 tokens of context), positions window/2 .. window-2
    predicting the token after each."""
    return window - 1 - window // 2


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def compact_rows(log_probs: torch.Tensor, targets: torch.Tensor, top_k: int = DEFAULT_TOP_K,
                 tail_samples: int = DEFAULT_TAIL_SAMPLES) -> CompactRows:
    """The compact form of `log_probs` (rows, vocab), the base model's log-softmax, for the
    right next tokens `targets` (rows,)."""
    import torch

    vocab = log_probs.shape[-1]
    if not 1 <= top_k < vocab:
        raise ValueError(f"top_k must be 1..{vocab - 1} (below the vocabulary size), got {top_k}")
    if tail_samples < 1:
        raise ValueError(f"tail_samples must be at least 1, got {tail_samples}")
    nll = -log_probs.gather(-1, targets[:, None])[:, 0]
    top_values, top_ids = torch.topk(log_probs, top_k, dim=-1)  # (rows, top_k), descending
    tail = log_probs.scatter(-1, top_ids, float("-inf"))  # (rows, vocab): the top-k masked out
    tail_log_mass = tail.logsumexp(-1)  # (rows,)
    # Systematic sample: the tail's cumulative distribution (in vocabulary order; the top-k add
    # nothing to it) at the middle of s equal strata. searchsorted finds the first token whose
    # cumulative share reaches each middle, never a masked one, which adds nothing.
    cdf = torch.cumsum(torch.exp(tail - tail_log_mass[:, None]), -1, dtype=torch.float64)
    middles = (torch.arange(tail_samples, dtype=torch.float64) + 0.5) / tail_samples
    picks = torch.searchsorted(cdf, middles.expand(len(cdf), -1).contiguous())
    picks = picks.clamp_(max=vocab - 1)  # (rows, tail_samples)
    return CompactRows(
        top_ids=top_ids.int(), top_log_probs=top_values.float(),
        tail_log_mass=tail_log_mass.float(), tail_ids=picks.int(),
        tail_log_probs=log_probs.gather(-1, picks).float(), nll=nll.float())


def compact_kld(rows: CompactRows, log_q: torch.Tensor) -> torch.Tensor:
    """(rows,) KL(base || quantized) from the base's compact rows and `log_q` (rows, vocab), the
    quantized model's log-softmax: the top-k terms exactly, plus T times the mean of
    ln p - ln q over the tail sample."""
    import torch

    log_p = rows.top_log_probs.double()
    head = (log_p.exp() * (log_p - log_q.gather(-1, rows.top_ids.long()).double())).sum(-1)
    ratio = rows.tail_log_probs.double() - log_q.gather(-1, rows.tail_ids.long()).double()
    log_t = rows.tail_log_mass.double()
    tail = torch.where(torch.isfinite(log_t), log_t.exp() * ratio.mean(-1), torch.zeros_like(log_t))
    return head + tail


def save_base_logits(path: str | os.PathLike, base: BaseLogits) -> None:
    """Write `base` to `path` atomically (a .npz archive: a JSON header and the arrays)."""
    _check_shapes(base, Path(path))
    header = {"format": FORMAT, "version": VERSION, **asdict(base.header)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                 tokens=base.tokens, **{k: getattr(base.rows, k) for k in ROW_FIELDS})


def load_base_logits(path: str | os.PathLike) -> BaseLogits:
    """Read a file `save_base_logits` wrote; ValueError naming the problem for anything else."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{str(path)!r} is not a zeropoint base-logits file "
                         f"(written by eval --kld --save-base): {e}") from None
    try:
        raw = json.loads(arrays.pop("header").tobytes().decode())
        if raw.pop("format") != FORMAT:
            raise ValueError("wrong format tag")
        if raw.pop("version") != VERSION:
            raise ValueError(f"version is not {VERSION}")
        header = BaseLogitsHeader(**raw)
        base = BaseLogits(header, arrays.pop("tokens"),
                          CompactRows(**{k: arrays.pop(k) for k in ROW_FIELDS}))
        if arrays:
            raise ValueError(f"unexpected arrays {sorted(arrays)}")
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a zeropoint base-logits file "
                         f"(written by eval --kld --save-base): {e}") from None
    _check_shapes(base, path)
    return base


def check_compatible(base: BaseLogits, *, text_sha: str, window: int, chunks: int,
                     tokens: np.ndarray | None = None, model: str | None = None,
                     vocab_size: int | None = None) -> None:
    """Raise BaseLogitsMismatch naming the first thing in which `base` differs from this
    evaluation: text, window, chunk count, base model, vocabulary size, or tokens."""
    h = base.header
    saved = "the base logits were saved"
    if h.text_sha256 != text_sha:
        raise BaseLogitsMismatch(f"{saved} for another text (sha256 {h.text_sha256[:12]}..., "
                                 f"this text's is {text_sha[:12]}...); use the same --text")
    if h.window != window:
        raise BaseLogitsMismatch(f"{saved} with --window {h.window}, not {window}")
    if h.chunks != chunks:
        raise BaseLogitsMismatch(f"{saved} over {h.chunks} chunks, not {chunks}; "
                                 f"use --chunks {h.chunks}")
    if model is not None and h.model != model:
        raise BaseLogitsMismatch(f"{saved} from model {h.model!r}, not {model!r}")
    if vocab_size is not None and h.vocab_size != vocab_size:
        raise BaseLogitsMismatch(
            f"the base model's vocabulary has {h.vocab_size} tokens and the quantized model's "
            f"{vocab_size}: KL-divergence needs two models with the same tokenizer")
    if tokens is not None:
        if tokens.shape != base.tokens.shape or not np.array_equal(tokens, base.tokens):
            where = _first_difference(base.tokens.reshape(-1), np.asarray(tokens).reshape(-1))
            raise BaseLogitsMismatch(
                f"the two models tokenize the text differently (first difference at token "
                f"{where}): KL-divergence needs two models with the same tokenizer")


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _check_shapes(base: BaseLogits, path: Path) -> None:
    h = base.header
    rows = h.chunks * h.scored_per_chunk
    expected = {"tokens": (h.chunks, h.window), "top_ids": (rows, h.top_k),
                "top_log_probs": (rows, h.top_k), "tail_log_mass": (rows,),
                "tail_ids": (rows, h.tail_samples), "tail_log_probs": (rows, h.tail_samples),
                "nll": (rows,)}
    for name, shape in expected.items():
        got = (base.tokens if name == "tokens" else getattr(base.rows, name)).shape
        if got != shape:
            raise ValueError(f"base logits for {str(path)!r} are damaged: {name} has shape "
                             f"{got}, the header implies {shape}")
    ids = (base.rows.top_ids, base.rows.tail_ids, base.tokens)
    if any(a.size and (a.min() < 0 or a.max() >= h.vocab_size) for a in ids):
        raise ValueError(f"base logits for {str(path)!r} are damaged: token ids outside the "
                         "vocabulary")
