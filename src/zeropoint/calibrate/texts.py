"""The default calibration text: a deterministic mix of kinds that install offline.

Calibrating on one kind of text (Python's pydoc topics, zeropoint's first default) fits the
quantization to that kind; a mix transfers better to text of another domain. The mix:

- prose:     the licence texts Debian ships in every system (/usr/share/common-licenses, package
             base-files) and the history of Python in its LICENSE.txt;
- code:      Python's own standard library source (a fixed list of modules);
- reference: the library reference pydoc renders from the docstrings of a fixed list of Python
             modules (not the pydoc topics: `zeropoint eval` scores on those by default);
- dialogue:  the English conversations of the `chatterbot-corpus` package (PyPI, data only;
             scripts/setup.sh installs it).

Every source is cut into pieces of about PIECE_CHARS characters at paragraph breaks and capped
at the length of the shortest source, and the pieces are dealt out in turn (prose, code,
reference, dialogue, prose, ...): any prefix of the mix, and any evenly spread sample of it, holds
the kinds in equal shares. Nothing used for scoring is in it: gensim's test texts (the lee news
corpora, the Wikipedia extract `enwiki-latest-pages-articles1...-shortened.bz2`, the newsgroups and
movie reviews) are kept out; tests/calibrate/test_texts.py checks that.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_CALIBRATION_NAME = "zeropoint:calibration-mix-v1"  # what imatrix files record
PIECE_CHARS = 2000

LICENCES = ("Apache-2.0", "Artistic", "BSD", "GFDL-1.3", "GPL-3", "LGPL-2.1", "MPL-2.0")
LICENCE_DIR = Path("/usr/share/common-licenses")
STDLIB_MODULES = (
    "textwrap", "heapq", "bisect", "fractions", "statistics", "dataclasses", "string", "shlex",
    "difflib", "calendar", "csv", "json.decoder", "json.encoder", "graphlib", "functools",
    "enum", "queue", "tokenize", "argparse", "pathlib", "configparser", "gettext", "wave",
)
REFERENCE_MODULES = (
    "collections", "itertools", "re", "datetime", "subprocess", "logging", "unittest",
    "decimal", "contextlib", "typing", "zipfile", "sqlite3", "threading", "struct",
)
_KEPT_SECTIONS = ("NAME", "DESCRIPTION", "CLASSES", "FUNCTIONS")  # not DATA (reprs), FILE (paths)
DIALOGUE_PACKAGE = "chatterbot_corpus"  # pip install --no-deps chatterbot-corpus==1.3.3


@dataclass(frozen=True)
class TextSource:
    name: str
    kind: str  # prose | code | reference | dialogue
    documents: Callable[[], list[str]]  # the source's documents, in a fixed order


def _licences() -> list[str]:
    docs = []
    for name in LICENCES:
        path = LICENCE_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"calibration source {path} is missing (Debian's base-files "
                                    "package ships it)")
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
    python_licence = Path(sys.base_prefix, "lib", f"python{sys.version_info.major}."
                          f"{sys.version_info.minor}", "LICENSE.txt")
    if python_licence.is_file():
        docs.append(python_licence.read_text(encoding="utf-8", errors="replace"))
    return docs


def _stdlib_code() -> list[str]:
    docs = []
    for module in STDLIB_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise FileNotFoundError(f"calibration source: the source of Python's {module!r} "
                                    "module is not installed")
        docs.append(Path(spec.origin).read_text(encoding="utf-8"))
    return docs


def _library_reference() -> list[str]:
    import importlib
    import pydoc
    import re

    docs = []
    for module in REFERENCE_MODULES:
        page = pydoc.render_doc(importlib.import_module(module), renderer=pydoc.plaintext)
        sections = re.split(r"^(?=[A-Z][A-Z ]*$)", page, flags=re.MULTILINE)
        kept = [sec for sec in sections if sec.split("\n", 1)[0].strip() in _KEPT_SECTIONS]
        docs.append(re.sub(r" at 0x[0-9a-f]+", "", "".join(kept)))  # no addresses
    return docs


def _conversations() -> list[str]:
    import yaml  # PyYAML: a dependency of transformers and huggingface_hub

    spec = importlib.util.find_spec(DIALOGUE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("calibration source: the dialogue corpus is not installed; "
                                "run `pip install --no-deps chatterbot-corpus==1.3.3` "
                                "(scripts/setup.sh does)")
    folder = Path(spec.submodule_search_locations[0], "data", "english")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, 10x faster, if built
    docs = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        for turns in data.get("conversations") or []:
            lines = [f"{'AB'[i % 2]}: {str(t).strip()}" for i, t in enumerate(turns) if t]
            if len(lines) >= 2:
                docs.append("\n".join(lines))
    return docs


SOURCES = (
    TextSource("licences (Debian common-licenses, Python's LICENSE.txt)", "prose", _licences),
    TextSource("Python standard library source", "code", _stdlib_code),
    TextSource("pydoc's library reference of Python modules", "reference", _library_reference),
    TextSource("chatterbot-corpus English conversations", "dialogue", _conversations),
)


def pieces(documents: list[str], piece_chars: int = PIECE_CHARS) -> list[str]:
    """The documents cut at blank lines (or, in a longer paragraph, at line breaks) and packed
    into pieces of at most about `piece_chars` characters: short documents (conversations) share
    a piece, so every source's pieces are of one size."""
    out, current = [], ""
    for doc in documents:
        for block in _blocks(doc, piece_chars):
            if current and len(current) + len(block) + 2 > piece_chars:
                out.append(current)
                current = ""
            current = f"{current}\n\n{block}" if current else block
    if current:
        out.append(current)
    return out


def _blocks(doc: str, limit: int) -> list[str]:
    blocks = []
    for para in doc.replace("\r\n", "\n").split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= limit:
            blocks.append(para)
            continue
        line_block = ""
        for line in para.split("\n"):
            if line_block and len(line_block) + len(line) + 1 > limit:
                blocks.append(line_block)
                line_block = ""
            line_block = f"{line_block}\n{line}" if line_block else line
        if line_block:
            blocks.append(line_block)
    return blocks


def mix(sources: tuple[TextSource, ...] = SOURCES, piece_chars: int = PIECE_CHARS) -> str:
    """The sources' pieces dealt out in turn, each source capped at the shortest one's length."""
    per_source = [pieces(s.documents(), piece_chars) for s in sources]
    cap = min(sum(map(len, p)) for p in per_source)
    capped = []
    for p in per_source:
        kept, total = [], 0
        for piece in p:
            if total >= cap:
                break
            kept.append(piece)
            total += len(piece)
        capped.append(kept)
    dealt = []
    for i in range(max(map(len, capped))):
        dealt.extend(p[i] for p in capped if i < len(p))
    return "\n\n".join(dealt) + "\n"


@lru_cache(maxsize=1)
def default_calibration_text() -> str:
    """zeropoint's default calibration text: mix(SOURCES), about 800,000 characters."""
    return mix()
