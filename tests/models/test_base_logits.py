"""The compact base-logits form: its parts against torch and a slow loop, its KL-divergence
against the full-vocabulary KL (torch's kl_div), the file's round trip and its mismatch errors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeropoint.models.base_logits import (
    BaseLogits,
    BaseLogitsHeader,
    BaseLogitsMismatch,
    CompactRows,
    check_compatible,
    compact_kld,
    compact_rows,
    load_base_logits,
    save_base_logits,
    scored_per_chunk,
    text_sha256,
)


def _lm_like(rows, vocab, seed, spread=2.5):
    """Log-softmax rows with a language model's shape: a few likely tokens, a long tail."""
    g = torch.Generator().manual_seed(seed)
    logits = spread * torch.randn(rows, vocab, generator=g) - 0.5 * torch.log1p(
        torch.arange(vocab, dtype=torch.float32))[torch.randperm(vocab, generator=g)]
    return logits


def _full_kld(base_logits, quant_logits):
    log_p = torch.log_softmax(base_logits.double(), -1)
    log_q = torch.log_softmax(quant_logits.double(), -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q)


def test_rows_hold_the_top_k_the_tail_mass_and_the_right_token():
    logits = _lm_like(16, 500, seed=1)
    log_p = torch.log_softmax(logits, -1)
    targets = torch.randint(0, 500, (16,))
    rows = compact_rows(log_p, targets, top_k=20, tail_samples=40)
    values, ids = torch.topk(log_p, 20)
    assert torch.equal(rows.top_ids.long(), ids) and torch.equal(rows.top_log_probs, values)
    p = log_p.double().exp()
    for r in range(16):
        rest = np.setdiff1d(np.arange(500), ids[r].numpy())
        assert math.exp(rows.tail_log_mass[r]) == pytest.approx(float(p[r, rest].sum()), rel=1e-5)
    assert torch.allclose(rows.nll, -log_p[torch.arange(16), targets])


def test_the_tail_sample_is_systematic():
    """Each tail token appears s * (its share of the tail) times, rounded down or up, as
    equal strata of the tail's distribution make it (counted here by a slow loop)."""
    logits = _lm_like(6, 300, seed=2)
    log_p = torch.log_softmax(logits.double(), -1)
    s, k = 50, 10
    rows = compact_rows(log_p.float(), torch.zeros(6, dtype=torch.long), top_k=k, tail_samples=s)
    for r in range(6):
        top = set(rows.top_ids[r].tolist())
        tail = {i: math.exp(float(log_p[r, i])) for i in range(300) if i not in top}
        mass = sum(tail.values())
        counts = {}
        for i in rows.tail_ids[r].tolist():
            assert i not in top
            counts[i] = counts.get(i, 0) + 1
        for i, share in tail.items():
            expected = s * share / mass
            assert math.floor(expected) <= counts.get(i, 0) <= math.ceil(expected)
        assert torch.allclose(rows.tail_log_probs[r], log_p[r, rows.tail_ids[r].long()].float())


def test_a_one_token_tail_gives_the_exact_kld():
    base, quant = _lm_like(8, 64, seed=3), _lm_like(8, 64, seed=4)
    rows = compact_rows(torch.log_softmax(base, -1), torch.zeros(8, dtype=torch.long), top_k=63,
                        tail_samples=4)
    got = compact_kld(rows, torch.log_softmax(quant, -1))
    assert torch.allclose(got, _full_kld(base, quant), rtol=1e-5, atol=1e-6)


def test_compact_kld_is_close_to_the_full_vocabulary_kld():
    """A long tail (12% of the mass outside the top 64, as SmolLM2's on prose) perturbed by
    independent noise on every logit, a harder case than quantization's: the head is exact, the
    sampled tail's error on the mean is a fraction of the mean's own standard error."""
    base = _lm_like(256, 4000, seed=5, spread=3.5)
    quant = base + 0.6 * torch.randn(base.shape, generator=torch.Generator().manual_seed(6))
    rows = compact_rows(torch.log_softmax(base, -1), torch.zeros(256, dtype=torch.long))
    assert float(rows.tail_log_mass.exp().mean()) > 0.1  # the tail matters in this test
    exact = _full_kld(base, quant)
    got = compact_kld(rows, torch.log_softmax(quant, -1))
    standard_error = float(exact.std()) / math.sqrt(len(exact))
    assert abs(float(got.mean() - exact.mean())) < 0.25 * standard_error
    assert float((got - exact).abs().max()) < 0.3 * float(exact.mean())
    # Lumping the tail into one outcome instead (T ln T/Q) would miss by far more.
    log_q = torch.log_softmax(quant.double(), -1)
    head = compact_rows(torch.log_softmax(base, -1), torch.zeros(256, dtype=torch.long),
                        tail_samples=1)
    log_t = head.tail_log_mass.double()
    log_q_tail = log_q.scatter(-1, head.top_ids.long(), float("-inf")).logsumexp(-1)
    log_p_top = head.top_log_probs.double()
    lumped = (log_p_top.exp() * (log_p_top - log_q.gather(-1, head.top_ids.long()))).sum(-1) \
        + log_t.exp() * (log_t - log_q_tail)
    assert float(exact.mean() - lumped.mean()) > 10 * abs(float(got.mean() - exact.mean()))


def test_bad_sizes_are_named():
    log_p = torch.log_softmax(torch.randn(2, 10), -1)
    with pytest.raises(ValueError, match="top_k must be 1..9"):
        compact_rows(log_p, torch.zeros(2, dtype=torch.long), top_k=10)
    with pytest.raises(ValueError, match="tail_samples must be at least 1"):
        compact_rows(log_p, torch.zeros(2, dtype=torch.long), top_k=3, tail_samples=0)


def _base(chunks=2, window=16, vocab=100, top_k=8, tail=5, text="some text"):
    rows = chunks * scored_per_chunk(window)
    log_p = torch.log_softmax(torch.randn(rows, vocab), -1)
    tokens = np.random.default_rng(0).integers(0, vocab, (chunks, window)).astype(np.int32)
    part = compact_rows(log_p, torch.from_numpy(tokens[:, window // 2 + 1:].reshape(-1)).long(),
                        top_k, tail)
    header = BaseLogitsHeader(model="/m/base.gguf", engine="torch", text_sha256=text_sha256(text),
                              window=window, chunks=chunks, vocab_size=vocab, top_k=top_k,
                              tail_samples=tail, add_bos=False)
    return BaseLogits(header, tokens, CompactRows.concatenate([part]))


def test_file_round_trip(tmp_path):
    base = _base()
    save_base_logits(tmp_path / "b.zpkld", base)
    back = load_base_logits(tmp_path / "b.zpkld")
    assert back.header == base.header
    assert np.array_equal(back.tokens, base.tokens)
    for name in vars(base.rows):
        assert np.array_equal(getattr(back.rows, name), getattr(base.rows, name)), name
    assert [p.name for p in tmp_path.iterdir()] == ["b.zpkld"]  # no temporary left beside it


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def fail_halfway(f, **arrays):
        f.write(b"PK partial archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_base_logits(tmp_path / "b.zpkld", _base())
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_arrays_are_not_written(tmp_path):
    base = _base()
    base.rows.tail_ids = base.rows.tail_ids[:, :2]
    with pytest.raises(ValueError, match="tail_ids has shape"):
        save_base_logits(tmp_path / "b.zpkld", base)
    assert list(tmp_path.iterdir()) == []


def test_other_files_are_refused_by_name(tmp_path):
    (tmp_path / "junk").write_bytes(b"_logits_" + bytes(100))  # llama.cpp's magic, not ours
    with pytest.raises(ValueError, match="not a zeropoint base-logits file"):
        load_base_logits(tmp_path / "junk")
    base = _base()
    save_base_logits(tmp_path / "short", base)
    with np.load(tmp_path / "short") as z:  # the header promises more rows than there are
        arrays = {k: z[k] for k in z.files}
    arrays["nll"] = arrays["nll"][:-1]
    with open(tmp_path / "short", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match="damaged: nll has shape"):
        load_base_logits(tmp_path / "short")


def test_a_mismatched_reuse_says_what_differs():
    base = _base(text="the text")
    ok = dict(text_sha=text_sha256("the text"), window=16, chunks=2)
    check_compatible(base, **ok, tokens=base.tokens.copy(), model="/m/base.gguf", vocab_size=100)
    cases = [
        (dict(ok, text_sha=text_sha256("other")), "another text"),
        (dict(ok, window=32), "--window 16, not 32"),
        (dict(ok, chunks=3), "over 2 chunks, not 3"),
        (dict(ok, model="/m/other.gguf"), "from model '/m/base.gguf'"),
        (dict(ok, vocab_size=101), "same tokenizer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BaseLogitsMismatch, match=message):
            check_compatible(base, **kwargs)
    other = base.tokens.copy()
    other[1, 3] += 1
    with pytest.raises(BaseLogitsMismatch, match="tokenize the text differently .* at token 19"):
        check_compatible(base, **ok, tokens=other)


def test_ten_times_smaller_than_llama_cpp_for_the_same_tokens():
    """llama-perplexity's file: magic, n_ctx, n_vocab, n_chunk, the tokens, then per scored
    token nv = 2 * ((n_vocab + 1) / 2) + 4 uint16 values (tools/perplexity/perplexity.cpp)."""
    vocab, window, chunks = 49152, 512, 1
    scored = chunks * scored_per_chunk(window)
    llama = 8 + 3 * 4 + 4 * window * chunks + scored * 2 * (2 * ((vocab + 1) // 2) + 4)
    base = _base(chunks=chunks, window=window, vocab=vocab, top_k=64, tail=128)
    header = len(json.dumps(vars(base.header)))
    assert llama / (base.nbytes() + header) > 10
