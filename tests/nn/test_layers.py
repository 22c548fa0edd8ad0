"""Finding a model's Linear and Embedding layers, and replacing one."""

import pytest
from torch import nn

from zeropoint.nn.layers import linear_layers, module_kind, replace_module


def test_module_kind():
    assert module_kind(nn.Linear(2, 3)) == "linear"
    assert module_kind(nn.Embedding(4, 2)) == "embedding"
    assert module_kind(nn.LayerNorm(2)) is None


def test_linear_layers_lists_a_shared_module_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Embedding(5, 4), shared, nn.ReLU(), nn.Sequential(nn.Linear(4, 2)),
                          shared)
    assert list(linear_layers(model)) == ["1", "3.0"]


def test_linear_layers_without_any():
    assert linear_layers(nn.ReLU()) == {}
    with pytest.raises(ValueError, match="ReLU has no nn.Linear layer.*the test needs at least"):
        linear_layers(nn.ReLU(), "the test")
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got int"):
        linear_layers(3)


def test_replace_module():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    replace_module(model, "0.0", nn.Identity())
    replace_module(model, "1", nn.ReLU())
    assert isinstance(model[0][0], nn.Identity) and isinstance(model[1], nn.ReLU)
