"""gguf/constants.py holds gguf-py's numbers (the oracle), so files need not import gguf-py."""
import gguf

from zeropoint.gguf import constants


def test_numbers_are_gguf_pys():
    for name in ("GGUF_MAGIC", "GGUF_VERSION", "GGUF_DEFAULT_ALIGNMENT", "GGML_QUANT_VERSION"):
        assert getattr(constants, name) == getattr(gguf, name), name


def test_value_types_are_gguf_pys_and_interchangeable():
    ours = {t.name: int(t) for t in constants.GGUFValueType}
    assert ours == {t.name: int(t) for t in gguf.GGUFValueType}
    theirs = gguf.GGUFValueType.STRING
    assert constants.GGUFValueType.STRING == theirs
    assert {constants.GGUFValueType.STRING: 1}[theirs] == 1  # same hash: dict keys work across
    assert constants.GGUFValueType(int(theirs)).name == theirs.name
