"""Recipe.spec_for: rules by name, which module kinds are eligible, rules added after."""

import pytest

from zeropoint import QuantSpec, Recipe, Rule

INT4 = QuantSpec(4, "symmetric", "per_group", group_size=32)
INT8 = QuantSpec(8, "symmetric", "per_channel")


def test_the_last_matching_rule_wins():
    recipe = Recipe(INT4, (Rule("*.down_proj", INT8), Rule("layers.0.*", None)))
    assert recipe.spec_for("layers.1.down_proj") == INT8
    assert recipe.spec_for("layers.0.down_proj") is None
    assert recipe.spec_for("layers.1.q_proj") == INT4


@pytest.mark.parametrize("quantize_embeddings", [False, True])
def test_module_kinds(quantize_embeddings):
    recipe = Recipe(INT4, (), quantize_embeddings=quantize_embeddings)
    assert recipe.spec_for("embed_tokens", "embedding") == (INT4 if quantize_embeddings else None)
    assert recipe.spec_for("q_proj", "linear") == INT4
    assert recipe.spec_for("norm", None) is None  # neither Linear nor Embedding: always float
    with pytest.raises(ValueError, match="unknown module kind 'conv'"):
        recipe.spec_for("c", "conv")


def test_with_rules_come_last_and_win():
    base = Recipe(INT4, (Rule("lm_head", INT8),), quantize_embeddings=True)
    more = base.with_rules([Rule("lm_*", None)])
    assert more.rules == (Rule("lm_head", INT8), Rule("lm_*", None))
    assert more.spec_for("lm_head") is None and base.spec_for("lm_head") == INT8
    assert more.quantize_embeddings and more.default == INT4
