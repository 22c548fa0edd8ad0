"""A Hugging Face tokenizer.json -> the tokenizer keys of a GGUF file, as llama.cpp reads them.

Two kinds of tokenizer.json are written (the facts are convert_hf_to_gguf's and llama-vocab.cpp's):
- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2/2.5/3): `tokenizer.ggml.model` "gpt2",
  tokens, types and merges; the pre-tokenizer ("pre") is read off tokenizer.json's structure
  (`TOKENIZER_PRE`), or given, or the family's;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3): "llama", with a
  score per token. llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined
  token scores highest; giving each token minus the rank of the merge that makes it reproduces
  BPE's merge order. `<0xNN>` tokens are BYTE; `add_space_prefix` follows the normalizer.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from gguf import GGUFWriter, SpecialVocab, TokenType

# Pre-tokenizers llama.cpp knows by name, told apart by tokenizer.json's structure.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_PRE = {
    "gpt-2": "ByteLevel with its GPT-2 regex",
    "smollm": "each digit split off, then ByteLevel with the GPT-2 regex (SmolLM, SmolLM2)",
    "llama-bpe": "Split on Llama 3's regex, then ByteLevel without a regex (Llama 3)",
    "qwen2": "Split on Qwen2's regex (single digits), then ByteLevel without a regex (Qwen)",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def read_tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{str(model_dir)!r} has no tokenizer.json; the GGUF export needs the "
                         "fast tokenizer saved with it (tokenizer.save_pretrained)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None


def tokenizer_kind(tok: Mapping) -> str:
    """"gpt2" (byte-level BPE) or "llama" (BPE with byte fallback); ValueError for others."""
    model = tok.get("model") or {}
    decoder = tok.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") \
            and decoder.get("type") == "ByteLevel":
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ValueError(f"tokenizer {model.get('type')!r} (byte_fallback "
                     f"{bool(model.get('byte_fallback'))}, decoder {decoder.get('type')!r}) is not "
                     "supported; the GGUF export handles byte-level BPE (SmolLM2, Llama 3, Qwen) "
                     "and BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3)")


def add_tokenizer(w: GGUFWriter, model_dir: Path, n_vocab: int, pre: str | None,
                  family_pre: str | None = None) -> None:
    """Write tokenizer.json's vocabulary into `w`. `pre` names llama.cpp's pre-tokenizer
    (byte-level BPE only) when given; else it is detected, else `family_pre` is used."""
    tok = read_tokenizer_json(model_dir)
    kind = tokenizer_kind(tok)
    model = tok["model"]
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id = {i: t for t, i in model.get("vocab", {}).items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, beyond config.json's "
                         f"vocab_size {n_vocab}")
    if kind == "gpt2":
        pre = pre or detect_pre(tok) or family_pre
        if pre is None:
            raise ValueError(
                f"cannot tell llama.cpp's pre-tokenizer from {str(model_dir / 'tokenizer.json')!r}"
                f" ({json.dumps(tok.get('pre_tokenizer'))[:200]}); pass tokenizer_pre, one "
                f"of: {', '.join(TOKENIZER_PRE)} (or another name llama.cpp knows)")
        _add_gpt2(w, by_id, added, n_vocab, pre)
    else:
        _add_llama(w, tok, by_id, added, n_vocab)
    special = SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)
    # llama.cpp adds a BOS unless told not to; say what the HF tokenizer does.
    for which in ("bos", "eos"):
        if which not in special.add_special_token:
            getattr(w, f"add_add_{which}_token")(False)


def _add_gpt2(w, by_id, added, n_vocab, pre) -> None:
    tokens, types = [], []
    for i in range(n_vocab):  # convert_hf_to_gguf's get_vocab_base
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            special = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])


def _add_llama(w, tok, by_id, added, n_vocab) -> None:
    model = tok["model"]
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):  # "a b" (older files) or ["a", "b"]
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, r)
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(text)
        if i in added and added[i].get("special"):
            scores.append(-1000.0)
            types.append(TokenType.UNKNOWN if text == unk else TokenType.CONTROL)
        elif i in added:
            scores.append(-1000.0)
            types.append(TokenType.USER_DEFINED)
        elif _BYTE_TOKEN.fullmatch(text):
            scores.append(0.0)
            types.append(TokenType.BYTE)
        else:
            scores.append(-float(rank.get(text, 0)))
            types.append(TokenType.UNKNOWN if text == unk else TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    w.add_add_space_prefix(_prepends_space(tok))


def _prepends_space(tok: Mapping) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2, Mistral) or not (Gemma)."""
    def steps(node):
        if not node:
            return []
        return node.get("normalizers") or node.get("pretokenizers") or [node]

    for step in steps(tok.get("normalizer")) + steps(tok.get("pre_tokenizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" \
                and step.get("add_prefix_space", True):
            return True
    return False


def detect_pre(tok: Mapping) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from its pre_tokenizer's structure."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_REGEX:
            return "llama-bpe"
        if regex == QWEN2_REGEX:
            return "qwen2"
    return None
