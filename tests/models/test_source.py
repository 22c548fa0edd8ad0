"""What a MODEL argument names: one function for every command and loader."""

import pytest

from zeropoint.modeldir.format import MANIFEST
from zeropoint.models.source import (
    DEFAULT_MODEL,
    FLOAT_KINDS,
    ModelLoadError,
    default_model_path,
    resolve_model,
)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "zp").mkdir()
    (tmp_path / "zp" / "config.json").write_text("{}")  # a zeropoint dir holds one too
    (tmp_path / "zp" / MANIFEST).write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "m.PT").write_bytes(b"")
    (tmp_path / "m.bin").write_bytes(b"")
    (tmp_path / "ggufs").mkdir()
    (tmp_path / "ggufs" / "a.gguf").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("name,kind", [("hf", "hf"), ("zp", "zeropoint"), ("m.gguf", "gguf"),
                                       ("m.PT", "module")])
def test_kinds(tree, name, kind):
    source = resolve_model(tree / name)
    assert source.kind == kind and source.path == tree / name
    assert resolve_model(str(tree / name)).kind == kind


def test_the_default_model_even_beside_a_file_called_default(tree, monkeypatch):
    monkeypatch.chdir(tree)
    (tree / DEFAULT_MODEL).mkdir()
    for name in (None, DEFAULT_MODEL):
        source = resolve_model(name)
        assert source.kind == "default" and source.is_gguf and source.path == default_model_path()


@pytest.mark.parametrize("name,message", [
    ("nope", "model path '.*nope' does not exist; accepted: a Hugging Face checkpoint"),
    ("m.bin", "unsupported model file '.*m.bin'; accepted:"),
    ("ggufs", r"has no config.json; it holds GGUF files \(a.gguf\): pass one of them"),
    ("zp", r"is a zeropoint directory \(already quantized: give its float source\); accepted: "
           r"a Hugging Face checkpoint directory \(config.json \+ \*.safetensors\), a .gguf file, "
           r"or nothing for the default"),
    ("m.PT", "is a pickled torch module file; accepted:"),
])
def test_errors_name_the_path_and_the_accepted_forms(tree, name, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(tree / name, FLOAT_KINDS)


def test_accept_must_name_known_kinds():
    with pytest.raises(ValueError, match="accept must be a non-empty subset"):
        resolve_model(None, ("gguf", "onnx"))
