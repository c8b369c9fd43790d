"""The vocabulary: every member is its own string, and a bad word is a ValueError."""

import json

import pytest

from altgrad.vocabulary import (COUNT_FIELDS, OPERAND_ROLES, ROLE_ABBREV, STAT_FIELDS, Backend, Granularity, Role,
                                Rounding, ScaleFormat, ScaleRounding, ScalingType, StatsLevel, choices, stat_fields)


@pytest.mark.parametrize("kind", [Role, ScalingType, Rounding, Backend, Granularity, ScaleFormat, ScaleRounding,
                                  StatsLevel])
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


def test_stat_fields_grow_with_the_level_in_buffer_order():
    levels = [stat_fields(level) for level in StatsLevel]
    assert levels[0] == ("amax", "scale", "numel") and levels[-1] == STAT_FIELDS
    for smaller, larger in zip(levels, levels[1:]):
        assert set(smaller) < set(larger)
    assert all(list(f) == sorted(f, key=STAT_FIELDS.index) for f in levels)
    assert set(stat_fields("counts")) - set(stat_fields("scale")) == set(COUNT_FIELDS)
    for bad in ("all", None, 1):
        with pytest.raises(ValueError, match=r"stats level must be one of scale, counts, full \(got "):
            stat_fields(bad)
