"""The default calibration mix (calibrate/texts.py): deterministic, the kinds in equal shares in
any prefix, and nothing of the texts zeropoint scores on."""
from __future__ import annotations

import bz2
import importlib.util
import re
from pathlib import Path

import pytest

from zeropoint.calibrate import texts
from zeropoint.calibrate.texts import SOURCES, mix, pieces


@pytest.fixture(scope="module")
def mixed():
    return mix()


def test_the_mix_is_deterministic(mixed):
    assert mix() == mixed and len(mixed) > 400_000


def test_pieces_are_dealt_in_turn(mixed):
    per_source = [pieces(s.documents()) for s in SOURCES]
    first = "\n\n".join(p[0] for p in per_source)
    assert mixed.startswith(first)
    # in the first quarter every kind has a share near a quarter
    prefix = mixed[: len(mixed) // 4]
    shares = []
    for p in per_source:
        shares.append(sum(len(piece) for piece in p if piece in prefix) / len(prefix))
    assert [s.kind for s in SOURCES] == ["prose", "code", "reference", "dialogue"]
    assert all(0.2 < s < 0.3 for s in shares), shares


def test_pieces_keep_paragraphs_and_size():
    docs = ["a" * 500 + "\n\n" + "b" * 700, "c" * 300, "line\n" * 1000]
    out = pieces(docs, piece_chars=1000)
    assert all(len(p) <= 1000 for p in out)
    assert "".join(out).replace("\n", "") == "".join(docs).replace("\n", "")
    assert out[0] == "a" * 500  # the b paragraph would not fit beside it


def _sentences(text: str) -> set[str]:
    return {s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " "))
            if len(s.strip()) > 50}


def test_nothing_scored_is_in_the_mix(mixed):
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        pytest.skip("gensim is not installed")
    data = Path(spec.submodule_search_locations[0], "test", "test_data")
    scored = [(data / "lee_background.cor").read_text(encoding="utf-8"),
              (data / "lee.cor").read_text(encoding="latin-1"),
              bz2.decompress((data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-"
                                      "shortened.bz2").read_bytes()).decode("utf-8")]
    ours = _sentences(mixed)
    for text in scored:
        theirs = _sentences(text)
        assert len(theirs) > 100 and not ours & theirs


def test_a_missing_source_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(texts, "DIALOGUE_PACKAGE", "no_such_package_here")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps chatterbot-corpus"):
        texts._conversations()


def test_evals_default_text_is_not_in_the_mix(mixed):
    from zeropoint.models.evaluate import default_text

    theirs = _sentences(default_text())
    assert len(theirs) > 1000 and not _sentences(mixed) & theirs


def test_the_same_mix_under_any_hash_seed(mixed):
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib; from zeropoint.calibrate.texts import mix; "
            "print(hashlib.sha1(mix().encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=seed), check=True).stdout.strip()
               for seed in ("1", "2")}
    assert digests == {hashlib.sha1(mixed.encode()).hexdigest()}
