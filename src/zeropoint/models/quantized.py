"""Load a zeropoint model directory (see modeldir/format.py) back into a model.

Loading rebuilds the architecture from config.json, swaps in QLinear/QEmbedding layers built
from the stored QTensors and loads every other tensor as stored, so the loaded model computes
bit-identical logits to the model that was saved.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..modeldir.format import read_tensors
from ..nn.fuse import fuse_shared_inputs
from ..nn.layers import replace_module
from ..nn.qlinear import QEmbedding, QLinear
from ..recipe import Recipe
from .load import LoadedModel


def load_quantized(directory, backend: str = "auto", fuse: bool = True):
    """A zeropoint directory -> LoadedModel with the quantized model in eval mode.
    fuse: as in quantize_model (sibling layers share one matmul; the outputs do not change)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    manifest, quantized, kept = read_tensors(directory)
    kind = manifest.extra.get("kind", "causal-lm")
    recipe = Recipe.from_dict(manifest.extra["recipe"]) if "recipe" in manifest.extra else Recipe()
    config = AutoConfig.from_pretrained(directory)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = auto.from_config(config).float()
    for name, q in quantized.items():
        module_name = name.removesuffix(".weight")
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Embedding):
            new = QEmbedding.replacing(module, q)
        else:
            new = QLinear(q, kept.get(module_name + ".bias"), recipe.activations, backend)
        replace_module(model, module_name, new)
    _tie_quantized_head(model, config, quantized, kept, recipe, backend)
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected:
        raise ValueError(f"{directory} holds tensors the architecture does not have: {unexpected[:5]}")
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in kept}
    untied = [k for k in missing if state[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{directory} lacks tensors the architecture needs: {untied[:5]}")
    if fuse:
        fuse_shared_inputs(model, backend)
    model.eval()
    has_tokenizer = any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer else None
    return LoadedModel(model, tokenizer, kind, str(directory), config)



def _tie_quantized_head(model, config, quantized, kept, recipe, backend) -> None:
    """A tied output head whose embedding was stored quantized (once: modeldir/writer.py)
    becomes a QLinear over the embedding's very QTensor, as transformers ties the float ones."""
    if not getattr(config, "tie_word_embeddings", False):
        return
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, QEmbedding) or not isinstance(head, nn.Linear):
        return
    head_name = next(n for n, m in model.named_modules() if m is head)
    if head_name + ".weight" in kept or head_name + ".weight" in quantized:
        return
    replace_module(model, head_name, QLinear(embed.weight_q, head.bias, recipe.activations, backend))
