"""An importance matrix computed as llama-imatrix computes it (cli/imatrix.py says how): the
calibration text in windows of `ctx` tokens, BOS handled as llama.cpp handles it, the sums of x^2
of each input column of every decoder weight matrix (calibrate/importance.py), by GGUF name. The
one home of that computation: `zeropoint imatrix` writes it to a file, `zeropoint sweep --imatrix
auto` computes it once for all its variants."""

from __future__ import annotations

import time
from dataclasses import dataclass

DEFAULT_CTX = 512
DEFAULT_BATCH_TOKENS = 2048  # tokens per forward pass, as llama-imatrix's default batch


@dataclass
class ImatrixRun:
    imatrix: object  # gguf.imatrix.ImportanceMatrix
    tokens: int
    windows: int
    ctx: int
    forward_seconds: float


def compute_imatrix(loaded, source, text: str, dataset: str, calib_tokens: int,
                    ctx: int = DEFAULT_CTX, process_output: bool = False,
                    progress: bool = False) -> ImatrixRun:
    """The importance matrix of `loaded` (models.LoadedModel of a causal LM with its tokenizer,
    read from `source`, a models.ModelSource) over the first `calib_tokens` tokens of `text`
    in whole windows of `ctx`; `dataset` names the text in the file. ValueError for too little
    text, too short windows, or a model without weight matrices llama.cpp names."""
    from ..calibrate.importance import collect_squared_inputs, imatrix_windows
    from ..gguf.imatrix import ImportanceMatrix

    if ctx < 16:
        raise ValueError(f"--ctx must be at least 16 tokens (llama.cpp ignores products over "
                         f"fewer), got {ctx}")
    if calib_tokens < 2 * ctx:
        raise ValueError(f"--calib-tokens must be at least two windows ({2 * ctx} tokens "
                         f"for --ctx {ctx}), got {calib_tokens}")
    if loaded.kind != "causal-lm" or loaded.tokenizer is None:
        raise ValueError("imatrix needs a causal language model with its tokenizer")
    max_windows = calib_tokens // ctx
    bos = _bos_to_add(loaded, source)
    ids = _tokenize(loaded.tokenizer, text, bos, max_windows * ctx)
    windows = imatrix_windows(ids, ctx, bos, max_windows)  # (n, ctx)
    modules = _weight_matrices(loaded.model, process_output)
    forward = loaded.model if process_output else loaded.model.base_model

    def run_forward(batch_ids):
        forward(input_ids=batch_ids, use_cache=False)

    batch = max(1, DEFAULT_BATCH_TOKENS // ctx)
    started = time.perf_counter()
    acc = collect_squared_inputs(run_forward, modules, windows, batch, progress=progress)
    imat = ImportanceMatrix(
        {name: acc.sums[name].float().numpy() for name in modules if name in acc.sums},
        {name: [acc.counts[name]] for name in modules if name in acc.sums},
        datasets=[dataset], chunk_count=windows.shape[0], chunk_size=ctx,
    )
    if not len(imat):
        raise ValueError("no weight matrix received any input; nothing to write")
    return ImatrixRun(imat, windows.numel(), windows.shape[0], ctx,
                      time.perf_counter() - started)


def _weight_matrices(model, process_output: bool) -> dict:
    """GGUF name -> nn.Linear for the matrices llama-imatrix collects."""
    from torch import nn

    from ..gguf.export import gguf_name

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        try:
            gname = gguf_name(name + ".weight")
        except ValueError:
            continue
        # A tied output matrix is token_embd in llama.cpp, which it never collects.
        if gname and (gname.startswith("blk.") or
                      (process_output and gname == "output.weight" and not tied)):
            found[gname] = module
    if not found:
        raise ValueError(f"{type(model).__name__} has no weight matrix with a GGUF name "
                           "(llama-family decoder blocks: attn_q/k/v/output, ffn_gate/up/down)")
    return found


def _bos_to_add(loaded, source) -> int | None:
    """The BOS id when llama.cpp would add one: a GGUF file's tokenizer.ggml.add_bos_token,
    else whether the tokenizer itself puts BOS in front of a text."""
    tok = loaded.tokenizer
    bos = tok.bos_token_id
    if bos is None:
        return None
    if source.is_gguf:
        from ..gguf.reader import read_gguf

        with read_gguf(source.path) as gf:
            flag = gf.get("tokenizer.ggml.add_bos_token")
            bos = gf.get("tokenizer.ggml.bos_token_id", bos)
        if flag is not None:
            return int(bos) if flag else None
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def _tokenize(tokenizer, text: str, bos: int | None, needed: int):
    """The text's ids (with BOS in front when `bos`), tokenizing only a prefix of a long text
    that is sure to hold `needed` tokens: a cut at a line break changes no token before it."""
    import torch

    prefix_chars = 16 * needed  # tokens average 3-5 characters in prose and code
    ids = None
    if len(text) > prefix_chars:
        cut = text.rfind("\n", 0, prefix_chars)
        ids = tokenizer(text[: cut if cut > 0 else prefix_chars],
                        add_special_tokens=False)["input_ids"]
    if ids is None or len(ids) < needed:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos is not None:
        ids = [bos, *ids]
    return torch.tensor(ids, dtype=torch.long)
