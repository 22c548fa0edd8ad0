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

import time

from ..models.imatrix import DEFAULT_CTX
from .calibration import DEFAULT_CALIB_TOKENS, calibration_source, calibration_text
from .common import CommandError, HelpFormatter, open_model, resolve

EPILOG = """examples:
  zeropoint imatrix -o imatrix.gguf                         (the default model, calibration mix)
  zeropoint imatrix model.gguf --calib text.txt --calib-tokens 16384 -o imatrix.dat
  zeropoint quantize model.gguf --type IQ4_XS --imatrix imatrix.gguf -o model-iq4_xs.gguf
"""


def add_parser(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (llama-imatrix's values and "
                                       "file formats) from calibration text",
                       description="The importance matrix of a model as llama-imatrix computes "
                                   "it (the mean of x^2 of each input column of every weight "
                                   "matrix), from calibration text.", epilog=EPILOG,
                       formatter_class=HelpFormatter)
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

    from ..gguf.imatrix import write_imatrix
    from ..models.imatrix import compute_imatrix

    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = resolve(args.model)
    text = calibration_text(args.calib)
    loaded = _open_float(args.model, source)
    loaded_at = time.perf_counter()
    try:
        result = compute_imatrix(loaded, source, text, calibration_source(args.calib),
                                 args.calib_tokens, args.ctx, args.process_output,
                                 progress=not args.quiet)
        write_imatrix(args.output, result.imatrix, args.format)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if not args.quiet:
        print(f"{len(result.imatrix)} matrices, {result.tokens} tokens in {result.windows} "
              f"windows of {args.ctx} -> {args.output}; {time.perf_counter() - started:.1f} s "
              f"in all (loading {loaded_at - started:.1f} s, forward "
              f"{result.forward_seconds:.1f} s)")


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


