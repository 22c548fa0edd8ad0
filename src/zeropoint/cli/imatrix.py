"""`zeropoint imatrix`: the importance matrix of a model, as llama-imatrix computes it, from
zeropoint's own forward hooks (calibrate/importance.py), written in either of llama.cpp's imatrix
formats (gguf/imatrix.py).

What llama-imatrix does, and so what this does: the calibration text is tokenized whole, with a
BOS in front when the model adds one; it is cut into consecutive windows of --ctx tokens (the rest
dropped; at least two windows' worth needed), each window's first token replaced by BOS when the
model adds one, each window an independent sequence. For every weight matrix inside the decoder
blocks (`blk.*`; the output matrix only with --process-output, token embeddings never, since
they are looked up rather than multiplied) it sums x^2 of each input column over every token.
Tensor names are the GGUF names (gguf/export.py's mapping), whatever the model was loaded from.
One difference: llama.cpp skips a matrix product over fewer than 16 tokens, which can drop the
tail of a window longer than its micro-batch (512); whole windows of up to 512 tokens, and any
multiple of 512, are never split that way.
"""

from __future__ import annotations

import argparse
import time

from .calibration import DEFAULT_CALIB_TOKENS, calibration_source, calibration_text
from .common import CommandError, open_model, resolve

DEFAULT_CTX = 512

EPILOG = """examples:
  zeropoint imatrix -o imatrix.gguf                         (the default model, calibration mix)
  zeropoint imatrix model.gguf --calib text.txt --calib-tokens 16384 -o imatrix.dat
  zeropoint quantize model.gguf --type IQ4_XS --imatrix imatrix.gguf -o model-iq4_xs.gguf
"""
DEFAULT_BATCH_TOKENS = 2048  # tokens per forward pass, as llama-imatrix's default batch


def add_parser(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (llama-imatrix's values and "
                                       "file formats) from calibration text",
                       description="The importance matrix of a model as llama-imatrix computes "
                                   "it (the mean of x^2 of each input column of every weight "
                                   "matrix), from calibration text.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="a .gguf file, a checkpoint directory or a zeropoint directory "
                        "(default: SmolLM2-135M)")
    p.add_argument("--calib", metavar="FILE",
                   help="calibration text (default: zeropoint's mixed calibration set)")
    p.add_argument("--calib-tokens", type=int, metavar="N", default=DEFAULT_CALIB_TOKENS,
                   help="use the first N tokens, in whole windows "
                        f"(default {DEFAULT_CALIB_TOKENS})")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, metavar="N",
                   help=f"tokens per window, llama-imatrix's -c (default {DEFAULT_CTX})")
    p.add_argument("-o", "--output", required=True, help="the imatrix file to write")
    p.add_argument("--format", choices=["gguf", "dat"],
                   help="gguf (llama.cpp's current format) or dat (the legacy one); default: dat "
                        "for a .dat output, else gguf")
    p.add_argument("--process-output", action="store_true",
                   help="also collect the output matrix (llama-imatrix --process-output)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=run)


def run(args) -> None:
    import torch

    from ..calibrate.importance import collect_squared_inputs, imatrix_windows
    from ..gguf.imatrix import ImportanceMatrix, write_imatrix

    if args.ctx < 16:
        raise CommandError(f"--ctx must be at least 16 tokens (llama.cpp ignores products over "
                           f"fewer), got {args.ctx}")
    if args.calib_tokens < 2 * args.ctx:
        raise CommandError(f"--calib-tokens must be at least two windows ({2 * args.ctx} tokens "
                           f"for --ctx {args.ctx}), got {args.calib_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = resolve(args.model)
    loaded = _open_float(args.model, source)
    loaded_at = time.perf_counter()
    if loaded.kind != "causal-lm" or loaded.tokenizer is None:
        raise CommandError("imatrix needs a causal language model with its tokenizer")
    max_windows = args.calib_tokens // args.ctx
    bos = _bos_to_add(loaded, source)
    ids = _tokenize(loaded.tokenizer, calibration_text(args.calib), bos, max_windows * args.ctx)
    try:
        windows = imatrix_windows(ids, args.ctx, bos, max_windows)  # (n, ctx)
    except ValueError as e:
        raise CommandError(str(e)) from None

    modules = _weight_matrices(loaded.model, args.process_output)
    model = loaded.model
    forward = model if args.process_output else model.base_model

    def run_forward(batch_ids):
        forward(input_ids=batch_ids, use_cache=False)

    batch = max(1, DEFAULT_BATCH_TOKENS // args.ctx)
    forward_at = time.perf_counter()
    acc = collect_squared_inputs(run_forward, modules, windows, batch, progress=not args.quiet)
    imat = ImportanceMatrix(
        {name: acc.sums[name].float().numpy() for name in modules if name in acc.sums},
        {name: [acc.counts[name]] for name in modules if name in acc.sums},
        datasets=[calibration_source(args.calib)],
        chunk_count=windows.shape[0], chunk_size=args.ctx,
    )
    forward_s = time.perf_counter() - forward_at
    if not len(imat):
        raise CommandError("no weight matrix received any input; nothing to write")
    try:
        write_imatrix(args.output, imat, args.format)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if not args.quiet:
        print(f"{len(imat)} matrices, {windows.numel()} tokens in {windows.shape[0]} windows of "
              f"{args.ctx} -> {args.output}; {time.perf_counter() - started:.1f} s in all "
              f"(loading {loaded_at - started:.1f} s, forward {forward_s:.1f} s)")


def _open_float(path, source):
    """The model, with a zeropoint directory's quantized layers as plain Linears holding the
    dequantized weights (so every model runs the float forward llama.cpp runs on its file)."""
    if source.kind != "zeropoint":
        return open_model(path)
    from ..models.quantized import load_quantized

    loaded = load_quantized(source.path, fuse=False)  # unfused: each Linear sees its input
    _dequantize_linears(loaded.model)
    return loaded


def _dequantize_linears(model) -> None:
    from torch import nn

    from ..nn.layers import replace_module
    from ..nn.qlinear import QLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, QLinear):
            linear = nn.Linear(module.in_features, module.out_features,
                               bias=module.bias is not None)
            linear.weight.data = module.weight_q.dequantize().float()
            if module.bias is not None:
                linear.bias.data = module.bias.data.float()
            replace_module(model, name, linear)


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
        raise CommandError(f"{type(model).__name__} has no weight matrix with a GGUF name "
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
