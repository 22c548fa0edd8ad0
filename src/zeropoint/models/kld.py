"""KL-divergence of a quantized model's next-token distributions from a base model's, by the
protocol of `llama-perplexity --kl-divergence` so that the figures compare with its own:

1. Tokenize the whole text once, with BOS in front when the tokenizer adds one (llama.cpp's
   `add_bos`), and cut the tokens into `chunks` consecutive chunks of `window` tokens (n_ctx);
   tokens past the last whole chunk are unused.
2. Run each chunk on its own from an empty cache, its first token replaced by BOS when the
   tokenizer adds one.
3. Score only the second half: the logits at positions window/2 .. window-2, each against the
   token that follows it (window - 1 - window/2 tokens a chunk: 255 for 512).

The base model's side is kept compact (base_logits.BaseLogits), so a base is run once and reused.
Unlike models/evaluate.perplexity (windows scored from their first token, no BOS), this is
llama.cpp's protocol; the two perplexities differ for that reason alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..metrics import KLDStatistics, kld_statistics
from ..threads import torch_threads
from .base_logits import (
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    BaseLogits,
    BaseLogitsHeader,
    CompactRows,
    check_compatible,
    compact_kld,
    compact_rows,
    scored_per_chunk,
    text_sha256,
)
from .evaluate import _device_of

# Logits of this many bytes at most are held at once (chunks run together in one batch).
LOGITS_BUDGET = 256 * 2**20


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]  # the whole text, BOS first when add_bos
    add_bos: bool
    bos_id: int | None


class TorchLogits:
    """Runs a transformers causal LM (float, GGUF dequantized, or a zeropoint directory)."""

    engine = "torch"

    def __init__(self, model: torch.nn.Module, tokenizer, source: str):
        if tokenizer is None:
            raise ValueError(f"{source} has no tokenizer; KL-divergence needs one to tokenize "
                             "the text")
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.vocab_size = int(model.config.vocab_size)

    def tokenize(self, text: str) -> Tokenized:
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # Whether this tokenizer puts BOS in front, judged on a probe as llama.cpp's add_bos is.
        plain = tok("a", add_special_tokens=False)["input_ids"]
        special = tok("a", add_special_tokens=True)["input_ids"]
        bos = tok.bos_token_id
        add_bos = bos is not None and len(special) > len(plain) and special[0] == bos
        return Tokenized([bos] + ids if add_bos else ids, add_bos, bos)

    def chunk_logits(self, inputs: np.ndarray) -> Iterator[torch.Tensor]:
        """(scored, vocab) float32 logits of each row of `inputs` (chunks, window), in order.

        On the CPU, groups of chunks run side by side, one per torch thread, each on a single
        intra-op thread: on a busy machine a team of intra-op threads waits at every op for
        its descheduled members (SmolLM2, 4 chunks of 512, load 10: two intra-op threads took
        29-32 s, two single-threaded workers 19-20 s), and on a quiet one both cores work."""
        window = inputs.shape[1]
        first, scored = window // 2, scored_per_chunk(window)
        batch = max(1, LOGITS_BUDGET // (4 * (window - first) * self.vocab_size))
        device = _device_of(self.model)
        workers = max(1, min(torch.get_num_threads(), len(inputs))) if device.type == "cpu" \
            else 1
        per = max(1, batch // workers)  # chunks a worker runs at once: the wave fits the budget
        groups = [inputs[start : start + per] for start in range(0, len(inputs), per)]

        def run(rows: np.ndarray) -> torch.Tensor:
            ids = torch.from_numpy(rows.astype(np.int64)).to(device)
            with torch.inference_mode():
                logits = self._forward(ids, window - first)  # (b, window - first, vocab)
            return logits[:, :scored].float()

        if workers == 1:
            for rows in groups:
                yield from run(rows)
            return
        from concurrent.futures import ThreadPoolExecutor


        with torch_threads(1), ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(groups), workers):
                for logits in pool.map(run, groups[start : start + workers]):
                    yield from logits

    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        # Only the scored half goes through the output layer (transformers' logits_to_keep).
        try:
            return self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        except TypeError:  # an architecture whose forward has no logits_to_keep
            return self.model(input_ids=ids, use_cache=False).logits[:, -keep:]


class LlamaCppLogits:
    """Runs a GGUF file in llama.cpp (llama-cpp-python): its kernels, its tokenizer. Like
    llama-perplexity, it asks llama.cpp for the scored half's logits only, so the output layer
    runs on half the positions."""

    engine = "llama.cpp"

    def __init__(self, path, window: int, threads: int):
        from ..gguf.llama_cpp import open_llama

        self.source = str(path)
        self.llm = open_llama(path, window, threads, logits_all=False)
        self.vocab_size = int(self.llm.n_vocab())

    def tokenize(self, text: str) -> Tokenized:
        llm = self.llm
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        add_bos = len(llm.tokenize(b"a", add_bos=True)) > len(llm.tokenize(b"a", add_bos=False))
        bos = int(llm.token_bos()) if add_bos else None
        return Tokenized([bos] + ids if add_bos else ids, add_bos, bos)

    def chunk_logits(self, inputs: np.ndarray) -> Iterator[torch.Tensor]:
        # llama-cpp-python's Llama.eval asks for every position's logits or the last one's;
        # its batch and context objects take per-position output flags directly.
        llm, window = self.llm, inputs.shape[1]
        first, scored = window // 2, scored_per_chunk(window)
        batch, context = llm._batch, llm._ctx
        for row in inputs:
            context.kv_cache_clear()
            outputs = []
            for start in range(0, window, llm.n_batch):
                part = row[start : start + llm.n_batch]
                b = batch.batch
                b.n_tokens = len(part)
                for i, token in enumerate(part.tolist()):
                    b.token[i], b.pos[i], b.n_seq_id[i] = token, start + i, 1
                    b.seq_id[i][0] = 0
                    b.logits[i] = start + i >= first
                context.decode(batch)
                wanted = max(0, start + len(part) - max(start, first))
                if wanted:
                    flat = np.ctypeslib.as_array(context.get_logits(),
                                                 shape=(wanted * self.vocab_size,))
                    outputs.append(flat.reshape(wanted, self.vocab_size).copy())
            yield torch.from_numpy(np.concatenate(outputs)[:scored])

    def close(self) -> None:
        self.llm.close()


def kld_windows(tokenized: Tokenized, window: int, chunks: int | None,
                cap_chunks: bool = False) -> np.ndarray:
    """(chunks, window) int32: the first `chunks` whole windows of the text's tokens (all of
    them when None; at most all of them with `cap_chunks`, else more is an error)."""
    if window < 4:
        raise ValueError(f"window must be at least 4 tokens (the second half is scored), "
                         f"got {window}")
    available = len(tokenized.ids) // window
    if available < 1:
        raise ValueError(f"the text has {len(tokenized.ids)} tokens, less than one window of "
                         f"{window}; give a longer --text or a smaller --window")
    if chunks is None or (cap_chunks and chunks > available):
        chunks = available
    if not 1 <= chunks <= available:
        raise ValueError(f"chunks must be 1..{available} (the text's whole windows of "
                         f"{window} tokens), got {chunks}")
    return np.asarray(tokenized.ids[: chunks * window], dtype=np.int32).reshape(chunks, window)


def model_inputs(tokens: np.ndarray, tokenized: Tokenized) -> np.ndarray:
    """The chunks as run: each one's first token replaced by BOS when the tokenizer adds one."""
    inputs = tokens.copy()
    if tokenized.add_bos:
        inputs[:, 0] = tokenized.bos_id
    return inputs


def targets_of(tokens: np.ndarray) -> np.ndarray:
    """(chunks, scored) the right next token of every scored position."""
    return tokens[:, tokens.shape[1] // 2 + 1 :]


def compute_base_logits(runner, text: str, window: int = 512, chunks: int | None = None,
                        top_k: int = DEFAULT_TOP_K,
                        tail_samples: int = DEFAULT_TAIL_SAMPLES,
                        cap_chunks: bool = False) -> BaseLogits:
    """Run the base model (`runner`: TorchLogits or LlamaCppLogits) over the first `chunks`
    windows of the text (see kld_windows) and keep its distributions compactly."""
    tokenized = runner.tokenize(text)
    tokens = kld_windows(tokenized, window, chunks, cap_chunks)
    targets = torch.from_numpy(targets_of(tokens).astype(np.int64))
    parts = []
    for logits, target in zip(runner.chunk_logits(model_inputs(tokens, tokenized)), targets):
        _check_vocab(logits, runner.vocab_size, runner.source)
        parts.append(compact_rows(torch.log_softmax(logits, dim=-1), target, top_k, tail_samples))
    header = BaseLogitsHeader(
        model=runner.source, engine=runner.engine, text_sha256=text_sha256(text), window=window,
        chunks=len(tokens), vocab_size=runner.vocab_size, top_k=top_k,
        tail_samples=tail_samples, add_bos=tokenized.add_bos)
    return BaseLogits(header, tokens, CompactRows.concatenate(parts))


@dataclass(frozen=True)
class PerToken:
    """Per scored token, in text order."""

    kld: np.ndarray  # (tokens,) float64
    nll: np.ndarray  # (tokens,) the quantized model's -ln p(right token)
    nll_base: np.ndarray
    same_top: np.ndarray  # (tokens,) bool


def kl_divergence(runner, base: BaseLogits, text: str) -> PerToken:
    """Run the quantized model over the chunks `base` was computed on and compare. Raises
    BaseLogitsMismatch when `base` belongs to another text, window or tokenizer."""
    h = base.header
    check_compatible(base, text_sha=text_sha256(text), window=h.window, chunks=h.chunks,
                     vocab_size=runner.vocab_size)
    tokenized = runner.tokenize(text)
    tokens = kld_windows(tokenized, h.window, None)[: h.chunks]
    check_compatible(base, text_sha=text_sha256(text), window=h.window, chunks=h.chunks,
                     tokens=tokens)
    targets = torch.from_numpy(targets_of(tokens).astype(np.int64))
    m = h.scored_per_chunk
    kld, nll, same = [], [], []
    chunks = runner.chunk_logits(model_inputs(tokens, tokenized))
    for c, (logits, target) in enumerate(zip(chunks, targets)):
        _check_vocab(logits, h.vocab_size, runner.source)
        rows = base.rows[c * m : (c + 1) * m]
        log_q = torch.log_softmax(logits, dim=-1)  # (scored, vocab)
        kld.append(compact_kld(rows, log_q))
        nll.append(-log_q.gather(-1, target[:, None])[:, 0].double())
        same.append(logits.argmax(-1) == rows.top_ids[:, 0])
    return PerToken(torch.cat(kld).numpy(), torch.cat(nll).numpy(),
                    base.rows.nll.astype(np.float64), torch.cat(same).numpy())


def kld_report(per_token: PerToken) -> KLDStatistics:
    return kld_statistics(per_token.kld, per_token.nll, per_token.nll_base, per_token.same_top)


def _check_vocab(logits: torch.Tensor, vocab_size: int, source: str) -> None:
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"{source} gives {logits.shape[-1]} logits a token, but its vocabulary "
                         f"has {vocab_size} tokens")
