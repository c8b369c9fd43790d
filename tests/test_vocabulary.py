"""The vocabulary: every member is its own string, and a bad word is a ValueError."""

import json

import pytest

from altgrad.vocabulary import (OPERAND_ROLES, ROLE_ABBREV, Backend, Granularity, Role, Rounding, ScaleFormat,
                                ScaleRounding, ScalingType, choices)


@pytest.mark.parametrize("kind", [Role, ScalingType, Rounding, Backend, Granularity, ScaleFormat, ScaleRounding])
def test_members_are_their_strings(kind):
    for m in kind:
        assert m == m.value and str(m) == m.value and f"{m}" == m.value and f"{m!s:>3}".strip() == m.value
        assert kind(m.value) is m and hash(m) == hash(m.value)
        assert json.loads(json.dumps({m: m})) == {m.value: m.value}
    assert choices(kind) == tuple(m.value for m in kind)


def test_unknown_word_is_value_error():
    with pytest.raises(ValueError, match="'grad_weight' is not a valid Role"):
        Role("grad_weight")


def test_operand_roles_and_abbreviations():
    assert OPERAND_ROLES == ("input", "weight", "grad_output")
    assert [ROLE_ABBREV[r] for r in Role] == ["i", "w", "go", "wg"]
    assert {"input": 1}[Role.INPUT] == 1  # a member finds a plain-string key
