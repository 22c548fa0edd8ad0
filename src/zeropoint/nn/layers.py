"""The layers of a model that zeropoint quantizes: finding them by kind, and swapping one out."""

from __future__ import annotations

from torch import nn


def module_kind(module: nn.Module) -> str | None:
    """"linear" or "embedding" (the kinds a Recipe assigns specs to), or None for any other
    module."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def linear_layers(model: nn.Module, needed_for: str | None = None) -> dict[str, nn.Linear]:
    """Every nn.Linear of `model` by qualified name, in registration order (a module registered
    twice is listed once, under its first name). needed_for: what needs at least one Linear,
    said in the ValueError raised when there is none; None accepts a model without any."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not layers and needed_for is not None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer (no torch.nn.Linear submodule), and "
            f"{needed_for} needs at least one"
        )
    return layers


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (a qualified name) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
