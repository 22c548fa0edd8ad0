"""`zeropoint eval BASE QUANTIZED --kld`: how far the quantized model's next-token distributions
are from the base model's, as `llama-perplexity --kl-divergence` reports it (its windows, its
statistics; see models/kld.py), for any two models zeropoint loads that share a tokenizer."""

from __future__ import annotations

from .common import CommandError, open_model, read_text, resolve, text_source, threads, write_json

KLD_HELP = """\
KL-divergence (--kld): the text is cut into --chunks windows of --window tokens (BOS first when
the tokenizer adds one) and the second half of each window is scored, as llama-perplexity
--kl-divergence does. The base model's distributions can be saved once (--save-base FILE, about
1.5 KB a scored token: the top-k log-probabilities, the tail's mass and a systematic sample of
the tail) and reused (--base-logits FILE, then give only QUANTIZED, or BASE too to check it).
"""


def add_kld_arguments(parser) -> None:
    from ..models.base_logits import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K

    g = parser.add_argument_group("KL-divergence", KLD_HELP)
    g.add_argument("--kld", action="store_true",
                   help="KL-divergence, Δp, same-top-token share and perplexity ratio of "
                        "QUANTIZED against MODEL (the base)")
    g.add_argument("--chunks", type=int, metavar="N",
                   help="windows to score (default: --max-tokens / --window, at most what "
                        "the text holds)")
    g.add_argument("--save-base", metavar="FILE",
                   help="write the base model's compact distributions to FILE (then QUANTIZED "
                        "may be left out)")
    g.add_argument("--base-logits", metavar="FILE",
                   help="read the base's distributions from FILE (written by --save-base) "
                        "instead of running the base model")
    g.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help="base log-probabilities kept exactly per token (default %(default)s)")
    g.add_argument("--tail-samples", type=int, default=DEFAULT_TAIL_SAMPLES,
                   help="tokens sampled from the rest of the base distribution per token "
                        "(default %(default)s)")


def run_kld(args) -> None:
    from ..models.base_logits import BaseLogitsMismatch, load_base_logits, save_base_logits
    from ..models.kld import compute_base_logits, kl_divergence, kld_report

    text = read_text(args.text)
    given = [args.model] + ([args.quantized] if args.quantized else [])
    try:
        if args.base_logits:
            if args.save_base:
                raise CommandError("give --save-base or --base-logits, not both")
            base = load_base_logits(args.base_logits)
            if len(given) == 2 and base.header.model != _source(given[0]):
                raise CommandError(f"{args.base_logits} holds the base logits of "
                                   f"{base.header.model!r}, not of {_source(given[0])!r}")
            if args.chunks is not None and args.chunks != base.header.chunks:
                raise CommandError(f"{args.base_logits} was saved over {base.header.chunks} "
                                   f"chunks, not --chunks {args.chunks}")
            if args.window != base.header.window:
                raise CommandError(f"{args.base_logits} was saved with --window "
                                   f"{base.header.window}, not {args.window}")
        else:
            if len(given) == 1 and not args.save_base:
                raise CommandError("--kld compares two models: give BASE QUANTIZED, or BASE "
                                   "--save-base FILE, or QUANTIZED --base-logits FILE")
            runner = _runner(given[0], args)
            chunks = args.chunks if args.chunks is not None else _default_chunks(args)
            base = compute_base_logits(runner, text, args.window, chunks, args.top_k,
                                       args.tail_samples, cap_chunks=args.chunks is None)
            _close(runner)
            del runner
            if args.save_base:
                save_base_logits(args.save_base, base)
                print(f"base logits of {base.header.model}: {base.header.chunks} chunks of "
                      f"{base.header.window} tokens, {base.nbytes() / 2**20:.2f} MiB -> "
                      f"{args.save_base}")
            if len(given) == 1:
                return
        quantized = _runner(given[-1], args)
        try:
            per_token = kl_divergence(quantized, base, text)
        finally:
            _close(quantized)
        stats = kld_report(per_token)
    except (BaseLogitsMismatch, ValueError) as e:
        raise CommandError(str(e)) from None
    h = base.header
    print(f"KL-divergence of {_source(given[-1])} from {h.model}: {h.chunks} chunks of "
          f"{h.window} tokens of {text_source(args.text)}, {stats.tokens} scored "
          f"(engine {args.engine}; base from {h.engine}, top {h.top_k} + {h.tail_samples} "
          f"tail samples)")
    print(format_kld(stats))
    if args.json:
        write_json(args.json, {
            "base": h.model, "quantized": _source(given[-1]), "engine": args.engine,
            "base_engine": h.engine, "text": text_source(args.text),
            "text_sha256": h.text_sha256, "window": h.window, "chunks": h.chunks,
            "top_k": h.top_k, "tail_samples": h.tail_samples,
            "base_logits": args.base_logits or args.save_base, **kld_json(stats),
        })


def format_kld(s) -> str:
    """The statistics, laid out as llama-perplexity prints them."""
    def pm(e):
        return f"{e.value:10.6f} ± {e.uncertainty:10.6f}"

    def pct(e):
        return f"{100 * e.value:6.3f} ± {100 * e.uncertainty:5.3f} %"

    lines = [
        f"Mean PPL(Q)                   : {pm(s.perplexity)}",
        f"Mean PPL(base)                : {pm(s.perplexity_base)}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s.log_perplexity_correlation:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {pm(s.log_perplexity_ratio)}",
        f"Mean PPL(Q)/PPL(base)         : {pm(s.perplexity_ratio)}",
        f"Mean PPL(Q)-PPL(base)         : {pm(s.perplexity_difference)}",
        "",
        f"Mean    KLD: {pm(s.kld)}",
        f"Maximum KLD: {s.kld_max:10.6f}",
        *[f"{p:4.1f}%   KLD: {v:10.6f}" for p, v in s.kld_percentiles.items() if p > 50],
        f"Median  KLD: {s.kld_median:10.6f}",
        *[f"{p:4.1f}%   KLD: {v:10.6f}" for p, v in s.kld_percentiles.items() if p < 50],
        f"Minimum KLD: {s.kld_min:10.6f}",
        "",
        f"Mean    Δp: {pct(s.delta_p)}",
        f"Maximum Δp: {100 * s.delta_p_max:6.3f}%",
        *[f"{p:4.1f}%   Δp: {100 * v:6.3f}%" for p, v in s.delta_p_percentiles.items() if p > 50],
        f"Median  Δp: {100 * s.delta_p_median:6.3f}%",
        *[f"{p:4.1f}%   Δp: {100 * v:6.3f}%" for p, v in s.delta_p_percentiles.items() if p < 50],
        f"Minimum Δp: {100 * s.delta_p_min:6.3f}%",
        f"RMS Δp    : {pct(s.delta_p_rms)}",
        f"Same top p: {pct(s.same_top)}",
    ]
    return "\n".join(lines)


def kld_json(s) -> dict:
    """Every figure of KLDStatistics as plain JSON values (percentile keys as strings)."""
    from dataclasses import asdict

    out = asdict(s)
    for key in ("kld_percentiles", "delta_p_percentiles"):
        out[key] = {f"{p:g}": v for p, v in out[key].items()}
    return out


def _default_chunks(args) -> int:
    if args.window < 1 or args.max_tokens < args.window:
        raise CommandError(f"--max-tokens ({args.max_tokens}) must hold at least one --window "
                           f"({args.window}); or give --chunks")
    return args.max_tokens // args.window


def _source(path: str) -> str:
    from ..models.source import FLOAT_KINDS

    return str(resolve(path, (*FLOAT_KINDS, "zeropoint")).path)


def _runner(path: str, args):
    from ..models.kld import LlamaCppLogits, TorchLogits

    if args.engine == "llama.cpp":
        source = resolve(path)
        if not source.is_gguf:
            raise CommandError(f"eval --kld --engine llama.cpp runs .gguf files, got {path!r}; "
                               "use --engine torch for other models")
        try:
            return LlamaCppLogits(source.path, args.window, threads())
        except ValueError as e:
            raise CommandError(str(e)) from None
    loaded = open_model(path)
    if loaded.kind != "causal-lm":
        raise CommandError(f"--kld compares next-token distributions: {path!r} is an "
                           f"{loaded.kind}, not a causal language model")
    try:
        return TorchLogits(loaded.model, loaded.tokenizer, _source(path))
    except ValueError as e:
        raise CommandError(str(e)) from None


def _close(runner) -> None:
    close = getattr(runner, "close", None)
    if close is not None:
        close()
