"""`quantize --bits N --imatrix FILE`: the importance matrix's entry for each layer to quantize,
found by the layer's GGUF name (gguf/export.py's mapping, as `zeropoint imatrix` and
llama-imatrix name them), and checked against the model before any work is done."""

from __future__ import annotations

from .common import CommandError


def module_importance(path: str, model, recipe, quiet: bool = False):
    """{module name: its importance (in_features,)} for every layer of `model` that `recipe`
    quantizes and the file has an entry for, as a lookup function (None for the others, which
    are quantized plainly). CommandError when the file cannot be read, has an entry of the wrong
    size, or has no entry for any of the layers: each names the file and what did not match."""
    from ..gguf.export import gguf_name
    from ..gguf.imatrix import read_imatrix
    from ..nn.layers import module_kind

    try:
        imatrix = read_imatrix(path)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(str(e)) from None
    targets = []  # (module name, GGUF name or None, in_features)
    for name, module in model.named_modules():
        if recipe.spec_for(name, module_kind(module)) is None or not hasattr(module, "weight"):
            continue
        try:
            gname = gguf_name(name + ".weight")
        except ValueError:  # a layer llama.cpp's files have no name for: no entry either
            gname = None
        targets.append((name, gname, module.weight.shape[-1]))
    found = {}
    for name, gname, columns in targets:
        imp = None if gname is None else imatrix.importance(gname)
        if imp is None:
            continue
        if imp.size != columns:
            raise CommandError(
                f"importance matrix {path!r}: its entry {gname} has {imp.size} values, but "
                f"{name} has {columns} input columns; was it made for this model?")
        found[name] = imp.reshape(-1)
    if not found:
        example = next(((n, g) for n, g, _ in targets if g is not None), None)
        looked = f" ({example[0]} is looked up as {example[1]})" if example else ""
        has = ", ".join(imatrix.names()[:3]) or "nothing"
        raise CommandError(
            f"importance matrix {path!r} has no entry for any of the {len(targets)} layers to "
            f"quantize{looked}; it holds {len(imatrix)} entries, e.g. {has}: was it made for "
            "this model?")
    if not quiet:
        print(f"importance matrix {path}: weights {len(found)} of {len(targets)} layers (the "
              "others keep min/max scales)")
    return found.get
