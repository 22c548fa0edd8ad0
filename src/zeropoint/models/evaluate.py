"""What quantization costs a whole model: perplexity for causal LMs, embedding cosine for encoders.

The texts are ones that install offline: Python's own pydoc topics (the default evaluation text)
gensim's Lee background corpus (news prose) and its Wikipedia extract (encyclopedic prose), both
held out from every calibration text.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# A blank line between pydoc topics, as between sections of prose. With it the default model
# reproduces the reference perplexity (15.27 measured by the issue author; 15.26 here); with no
# separator the topics run into each other and it scores 15.20.
TOPIC_SEPARATOR = "\n\n"


def default_text() -> str:
    """Python's pydoc topics (`pydoc_data.topics`), joined in sorted key order by blank lines."""
    from pydoc_data.topics import topics

    return TOPIC_SEPARATOR.join(topics[key] for key in sorted(topics))


WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _gensim_test_file(name: str) -> Path:
    """A file of gensim's `test/test_data`, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} comes with the gensim package: "
                                "pip install --no-deps gensim")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"gensim is installed but has no {path}")
    return path


def lee_text() -> str:
    """gensim's `lee_background.cor`: news prose."""
    return _gensim_test_file("lee_background.cor").read_text(encoding="utf-8")


def wikipedia_text() -> str:
    """The articles of gensim's Wikipedia extract, wiki markup roughly stripped: encyclopedic
    prose, a domain the default calibration mix (calibrate/texts.py) does not hold."""
    xml = bz2.decompress(_gensim_test_file(WIKIPEDIA_FILE).read_bytes()).decode("utf-8")
    articles = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.DOTALL):
        text = html.unescape(body)
        if text.startswith("#REDIRECT"):
            continue
        for _ in range(3):  # templates nest up to three deep in this extract
            text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.DOTALL)  # tables
        text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<!--.*?-->", "", text, flags=re.DOTALL)
        text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
        text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
        text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
        text = re.sub(r"<[^>]+>|'''?", "", text)
        text = re.sub(r"^=+\s*(.*?)\s*=+$", r"\1", text, flags=re.MULTILINE)
        lines = [ln for ln in text.splitlines()
                 if ln.strip() and not ln.startswith(("|", "!", "*", ":"))]
        if sum(map(len, lines)) > 2000:
            articles.append("\n".join(lines))
    return "\n\n".join(articles)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float  # exp(nll)
    tokens: int  # predicted tokens: the tokens that were scored
    nll: float  # mean negative log-likelihood per predicted token, in nats


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    window: int = 512,
    max_tokens: int = 2048,
) -> PerplexityResult:
    """Perplexity of a causal LM on `text`, by this exact protocol:

    1. Tokenize `text` with `add_special_tokens=False` (no BOS is added) and keep the first
       `max_tokens` tokens.
    2. Cut them into consecutive, non-overlapping windows of `window` tokens; the last window
       may be shorter.
    3. Score each window on its own, with no context from the windows before it: token t of a
       window is predicted from tokens 0..t-1 of that window, so the first token of every window
       is not predicted (and a last window of a single token contributes nothing).
    4. nll = the mean of -log p(token) over all predicted tokens (natural log, float32 logits);
       perplexity = exp(nll); `tokens` = the number of predicted tokens.

    With the defaults (window 512, 2048 tokens) the float32 SmolLM2-135M-Instruct scores about
    15.26 on `default_text()`: 4 windows, 2044 predicted tokens.
    """
    if window < 2:
        raise ValueError(
            f"window must be at least 2 tokens (one context, one predicted), got {window}"
        )
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    ids = encoded["input_ids"][0, :max_tokens]  # (tokens,)
    if ids.numel() < 2:
        raise ValueError(f"text has {ids.numel()} token(s); perplexity needs at least 2")
    device = _device_of(model)
    total_nll, predicted = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel(), window):
            chunk = ids[start : start + window].to(device)
            if chunk.numel() < 2:
                break
            logits = model(input_ids=chunk[None], use_cache=False).logits[0].float()
            # (window - 1, vocab) predictions of tokens 1..window-1
            total_nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
            predicted += chunk.numel() - 1
    nll = total_nll / predicted
    return PerplexityResult(perplexity=math.exp(nll), tokens=predicted, nll=nll)


def embedding_cosine(
    float_model: torch.nn.Module,
    quant_model: torch.nn.Module,
    tokenizer,
    texts: str | Sequence[str],
) -> float:
    """Mean over `texts` of the cosine between the two models' sentence embeddings.

    A sentence embedding is the mean of the last hidden states over the sentence's tokens,
    weighted by the attention mask so that padding does not count (the pooling of
    sentence-transformers models such as all-MiniLM-L6-v2). 1.0 means the quantized model embeds
    every sentence in exactly the same direction as the float model.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("texts must hold at least one sentence, got none")
    # Without a pad token sentences cannot share a batch; one at a time needs no padding.
    batch = len(texts) if getattr(tokenizer, "pad_token", None) is not None else 1
    cosines = []
    for i in range(0, len(texts), batch):
        encoded = tokenizer(
            texts[i : i + batch], padding=True, truncation=True, return_tensors="pt"
        )
        a = _mean_pooled(float_model, encoded)
        b = _mean_pooled(quant_model, encoded)
        cosines.append(F.cosine_similarity(a.double(), b.double(), dim=-1))
    return torch.cat(cosines).mean().item()


def _mean_pooled(model: torch.nn.Module, encoded) -> torch.Tensor:
    """(batch, hidden) attention-mask weighted mean of the last hidden states."""
    device = _device_of(model)
    inputs = {k: v.to(device) for k, v in encoded.items()}
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1].float()  # (batch, tokens, hidden)
    mask = inputs["attention_mask"].to(hidden.dtype).unsqueeze(-1)  # (batch, tokens, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
