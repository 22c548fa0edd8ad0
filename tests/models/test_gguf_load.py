"""zeropoint's GGUF loader (models/gguf_load.py via load_model) against transformers' own GGUF
loader, the oracle: the same config, the same float32 state dict bit for bit, the same logits and
the same token ids, on every family's tiny checkpoint exported to GGUF and on the real models.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from family_checkpoints import FAMILY_NAMES, TEXT, tiny_checkpoint

from zeropoint.gguf.export import export_hf
from zeropoint.gguf.reader import read_gguf
from zeropoint.models import load_model
from zeropoint.models.gguf_load import gguf_config_dict, hf_config
from zeropoint.models.load import _apply_rope_factors

SPECIALS = " <s> </s> <|im_start|> <bos> <eos> <unk>\n\n  two  spaces"


def transformers_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def transformers_model(path: Path, config):
    """transformers' GGUF loader, given the config zeropoint made (its overrides change shapes:
    Qwen3's head size), with Llama 3.1's rope factors applied as load_model applies them."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": config._attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=copy.deepcopy(config), dtype=torch.float32,
        local_files_only=True, **extra).eval()
    _apply_rope_factors(model, read_gguf(path))
    return model


def transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def without_path(config) -> dict:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return d


def assert_same_model(ours, theirs, ids):
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_state) == sorted(their_state)
    differ = [k for k in their_state if not torch.equal(ours_state[k], their_state[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    with torch.inference_mode():
        a = ours(input_ids=torch.tensor([ids]), use_cache=False).logits
        b = theirs(input_ids=torch.tensor([ids]), use_cache=False).logits
    assert torch.equal(a, b)


def assert_same_tokenizer(ours, theirs, text):
    assert type(ours) is type(theirs)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_family_gguf_loads_as_transformers_loads_it(name, tmp_path):
    path = tmp_path / "q8.gguf"
    export_hf(tiny_checkpoint(name), path, "Q8_0")  # norms stay F32, matrices are Q8_0 blocks
    loaded = load_model(path, progress=False)
    if name != "mistral":  # a llama file named "mistral": load_model runs it as llama
        assert without_path(hf_config(gguf_config_dict(read_gguf(path)))) == \
            without_path(transformers_config(path))
    tok = transformers_tokenizer(path)
    assert_same_tokenizer(loaded.tokenizer, tok, TEXT + SPECIALS)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:64]
    assert_same_model(loaded.model, transformers_model(path, loaded.config), ids)


def test_the_config_names_the_file_family_of_a_mistral_named_llama_file(tmp_path):
    """transformers reads a llama file whose general.name is "mistral" as Mistral; the loader
    keeps llama.cpp's reading (llama, no sliding window)."""
    path = tmp_path / "f32.gguf"
    export_hf(tiny_checkpoint("mistral"), path, "F32")
    assert read_gguf(path).get("general.name") == "mistral"
    assert transformers_config(path).model_type == "mistral"
    loaded = load_model(path, progress=False)
    assert loaded.config.model_type == "llama"


@pytest.mark.slow
def test_smollm2_loads_as_transformers_loads_it():
    from zeropoint.models.evaluate import wikipedia_text
    from zeropoint.models.source import default_model_path

    path = Path(default_model_path())
    loaded = load_model(path, progress=False)
    assert without_path(hf_config(gguf_config_dict(read_gguf(path)))) == \
        without_path(transformers_config(path))
    tok = transformers_tokenizer(path)
    assert_same_tokenizer(loaded.tokenizer, tok, wikipedia_text()[:4000] + SPECIALS)
    ids = tok(TEXT)["input_ids"][:32]
    assert_same_model(loaded.model, transformers_model(path, loaded.config), ids)


@pytest.mark.slow
def test_gemma3_loads_as_transformers_loads_it(gemma3_gguf):
    path = Path(gemma3_gguf)
    loaded = load_model(path, progress=False)
    ids = loaded.tokenizer(TEXT)["input_ids"][:32]
    assert_same_model(loaded.model, transformers_model(path, loaded.config), ids)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_a_tensor_without_a_place_or_a_missing_one_is_refused_naming_it(change, tmp_path):
    import numpy as np

    from zeropoint.gguf.requantize import SourceTensor, gguf_sources, write_quantized
    from zeropoint.models import ModelLoadError

    path, bad = tmp_path / "f32.gguf", tmp_path / "bad.gguf"
    export_hf(tiny_checkpoint("qwen2"), path, "F32")
    src = read_gguf(path)
    sources = gguf_sources(src)
    if change == "extra":
        ones = np.ones(64, dtype=np.float32)
        sources.append(SourceTensor("blk.0.attn_gate.weight", "F32", (64,),
                                    lambda: ones.view(np.uint8)))
        expected = "blk.0.attn_gate.weight"
    else:
        sources = [s for s in sources if s.name != "blk.1.ffn_up.weight"]
        expected = "model.layers.1.mlp.up_proj.weight"
    write_quantized(sources, src.metadata, "F32", bad)
    with pytest.raises(ModelLoadError, match=expected):
        load_model(bad, progress=False)
