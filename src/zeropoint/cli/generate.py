"""`zeropoint generate`: run a model on a prompt and stream its text.

A zeropoint directory or a Hugging Face directory runs in torch: on the compact decoder where it
supports the family, else on transformers' modules (zeropoint's quantized ones for a zeropoint
directory). A GGUF file (and 'default') runs on llama.cpp. Whatever runs the model, tokens are
chosen by nn.generate's Sampler: greedy unless --temperature is above 0. The text goes to
stdout as it comes; which engine ran and how fast goes to stderr, so stdout is just the text.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from .common import CommandError, HelpFormatter, resolve, write_json

DEFAULT_MAX_TOKENS = 128
LLAMA_CPP_MAX_CONTEXT = 4096  # llama.cpp's cache is allocated for the whole context on open

EPILOG = """examples:
  zeropoint generate out/smollm2-int4 --prompt "The three primary colors are"
  zeropoint generate default --chat --prompt "Name a prime number." --max-tokens 32
  zeropoint generate model.gguf --temperature 0.8 --top-p 0.95 --seed 1 --prompt "Once"
  zeropoint generate out/smollm2-int4 --interactive     (one turn a line, until end of input)
"""


def add_parser(sub) -> None:
    g = sub.add_parser(
        "generate", help="run a model on a prompt and stream its text",
        description="Run a model (a zeropoint directory, a .gguf file, a Hugging Face directory\n"
                    "or 'default') on a prompt and stream the text. Greedy unless --temperature\n"
                    "is above 0; time to first token and tokens/s go to stderr.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    g.add_argument("model", help="zeropoint directory, .gguf file, Hugging Face checkpoint "
                                 "directory, or 'default' (SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", help="the text to continue (or, with --chat, the user's message)")
    g.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"most new tokens (default {DEFAULT_MAX_TOKENS}); an end-of-sequence "
                        "token stops earlier")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template as a user message")
    g.add_argument("--temperature", type=float,
                   help="sample at this temperature (default: greedy decoding)")
    g.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, help="sample among the most likely tokens whose "
                                               "probabilities add up to P")
    g.add_argument("--seed", type=int, help="seed of the sampler: the same seed, the same text "
                                            "(default: a random seed, shown on stderr)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate all --max-tokens tokens, past end-of-sequence (for timing)")
    g.add_argument("--interactive", action="store_true",
                   help="a conversation: read one user turn a line from stdin until end of "
                        "input, keeping the turns before (needs a chat template)")
    g.add_argument("--json", metavar="PATH",
                   help="write the engine, the token ids, the text and the timings as JSON")
    g.set_defaults(func=run)


def run(args) -> None:
    sampling = _sampling(args)
    if args.max_tokens < 1:
        raise CommandError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.interactive and args.prompt is not None:
        raise CommandError("--prompt and --interactive exclude each other: the interactive mode "
                           "reads its turns from stdin")
    if not args.interactive and not args.prompt:
        raise CommandError("give a --prompt (non-empty), or --interactive to read turns from "
                           "stdin")
    from ..nn.generate import Sampler

    model = _open(args.model)
    chat = args.chat or args.interactive
    if chat and model.chat_template is None:
        raise CommandError(f"{args.model!r} has no chat template, so --chat and --interactive "
                           "cannot format a conversation; drop them to continue plain text")
    print(f"engine: {model.engine}", file=sys.stderr)
    sampler = Sampler(sampling)
    if not sampling.greedy:
        print(f"seed: {sampler.seed}", file=sys.stderr)
    stop = () if args.ignore_eos else model.stop
    turns = []
    try:
        if args.interactive:
            turns = _conversation(model, sampler, args.max_tokens, stop)
        else:
            ids = (model.chat([{"role": "user", "content": args.prompt}]) if chat
                   else model.encode(args.prompt))
            turns.append(_turn(model, sampler, ids, args.max_tokens, stop))
    finally:
        model.close()
    if args.json:
        write_json(args.json, {"model": str(args.model), "engine": model.engine,
                               "seed": sampler.seed, "turns": [vars(t) for t in turns]})


def _sampling(args):
    from ..nn.generate import Sampling

    if args.temperature in (None, 0):
        given = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p),
                                          ("--seed", args.seed)) if value is not None]
        if given:
            raise CommandError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                               "sampling; give --temperature above 0 too (without it, "
                               "decoding is greedy)")
    try:
        return Sampling(temperature=args.temperature or 0.0, top_k=args.top_k or 0,
                        top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed)
    except ValueError as e:
        raise CommandError(str(e).replace("top_k", "--top-k").replace("top_p", "--top-p")
                           .replace("temperature", "--temperature", 1)
                           .replace("seed must", "--seed must")) from None


@dataclass
class Turn:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    seconds_to_first_token: float = 0.0
    tokens_per_second: float | None = None  # after the first token; None with only one


def _turn(model, sampler, prompt: list[int], max_tokens: int, stop) -> Turn:
    """Generate after `prompt`, writing the text to stdout as it comes and the timings to
    stderr."""
    from ..nn.generate import stream_tokens

    turn, shown = Turn(list(prompt)), ""
    started = time.perf_counter()
    first = started
    try:
        for token in stream_tokens(model.decoder, prompt, max_tokens, sampler, stop):
            if not turn.tokens:
                first = time.perf_counter()
            turn.tokens.append(token)
            shown = _show(model.decode(turn.tokens), shown)
    except ValueError as e:  # a prompt longer than the context
        raise CommandError(str(e)) from None
    ended = time.perf_counter()
    sys.stdout.write("\n")
    sys.stdout.flush()
    turn.text = model.decode(turn.tokens)
    turn.seconds_to_first_token = first - started
    n = len(turn.tokens)
    if n > 1:
        turn.tokens_per_second = (n - 1) / max(ended - first, 1e-9)
    rate = f"{turn.tokens_per_second:.1f} tokens/s" if n > 1 else "one token"
    first_ms = 1000 * turn.seconds_to_first_token
    print(f"{n} token{'s' if n > 1 else ''}: time to first token {first_ms:.0f} ms, {rate}",
          file=sys.stderr)
    return turn


def _show(text: str, shown: str) -> str:
    """Write what `text` adds to what is `shown`; a character still incomplete (U+FFFD at the
    end: a multi-byte character split across tokens) waits for the next token."""
    if text.endswith("\ufffd"):
        return shown
    common = 0
    for a, b in zip(text, shown):
        if a != b:
            break
        common += 1
    sys.stdout.write(text[common:] if common == len(shown) else "\n" + text)
    sys.stdout.flush()
    return text


def _conversation(model, sampler, max_tokens: int, stop) -> list[Turn]:
    """Turns from stdin, one a line, each answered with the whole conversation before it."""
    messages, turns = [], []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return turns
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        turn = _turn(model, sampler, model.chat(messages), max_tokens, stop)
        turns.append(turn)
        messages.append({"role": "assistant", "content": model.decode(
            [t for t in turn.tokens if t not in model.stop])})


# --- the model and its tokenizer, per engine -----------------------------------------------------


class _TorchModel:
    """A causal LM in torch with its transformers tokenizer."""

    def __init__(self, loaded, quantized: bool):
        from ..nn.generate import TorchDecoder

        self.decoder = TorchDecoder(loaded.model)
        self.tokenizer = loaded.tokenizer
        self.engine = self.decoder.engine
        if self.decoder.compact is None:
            kind = loaded.config.model_type
            what = "zeropoint's quantized modules" if quantized else "its float modules"
            self.engine = (f"transformers with {what} (the compact decoder does not run model "
                           f"type {kind!r})")
        self.chat_template = getattr(self.tokenizer, "chat_template", None)
        ends = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        if self.tokenizer.eos_token_id is not None:
            ends.append(self.tokenizer.eos_token_id)
        self.stop = frozenset(ends)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def chat(self, messages) -> list[int]:
        return list(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        pass


class _LlamaCppModel:
    """A GGUF file in llama.cpp with llama.cpp's tokenizer; the chat template is rendered as
    transformers renders it."""

    def __init__(self, path):
        from ..gguf.llama_cpp import LlamaCppDecoder
        from ..gguf.reader import read_gguf

        f = read_gguf(path)
        arch = f.get("general.architecture")
        context = f.get(f"{arch}.context_length") or LLAMA_CPP_MAX_CONTEXT
        from .common import threads

        self.decoder = LlamaCppDecoder(path, min(int(context), LLAMA_CPP_MAX_CONTEXT), threads())
        self.engine = self.decoder.engine
        self.chat_template = self.decoder.chat_template
        self.stop = _EndTokens(self.decoder)

    def encode(self, text: str) -> list[int]:
        return self.decoder.encode(text)

    def chat(self, messages) -> list[int]:
        from transformers.utils.chat_template_utils import render_jinja_template

        d = self.decoder
        rendered, _ = render_jinja_template(
            [messages], chat_template=self.chat_template, add_generation_prompt=True,
            bos_token=d.token_text(d.bos_token), eos_token=d.token_text(d.eos_token))
        return d.encode(rendered[0], special=True)

    def decode(self, ids) -> str:
        return self.decoder.decode(ids)

    def close(self) -> None:
        self.decoder.close()


class _EndTokens:
    """The tokens that end a generation in llama.cpp's vocabulary, as a container."""

    def __init__(self, decoder):
        self.decoder = decoder

    def __contains__(self, token) -> bool:
        return self.decoder.is_end(token)


def _open(model: str):
    from ..models.source import ModelLoadError

    source = resolve(model, ("default", "gguf", "hf", "zeropoint"))
    try:
        if source.is_gguf:
            try:
                return _LlamaCppModel(source.path)
            except ImportError:
                raise CommandError("running a GGUF file needs llama-cpp-python: pip install "
                                   "llama-cpp-python") from None
        from .common import open_model

        loaded = open_model(str(source.path))
    except (ModelLoadError, ValueError) as e:
        raise CommandError(str(e)) from None
    if loaded.kind != "causal-lm" or loaded.tokenizer is None:
        what = "has no tokenizer" if loaded.tokenizer is None else f"is an {loaded.kind}"
        raise CommandError(f"{model!r} {what}; generate runs causal language models with their "
                           "tokenizer")
    return _TorchModel(loaded, quantized=source.kind == "zeropoint")
