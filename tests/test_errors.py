import pytest

from lmlab.errors import ConfigError, pick_names

VALID = ("linear", "exponential", "free_running")


def test_pick_names_from_a_string_or_a_list():
    assert pick_names(" linear, free_running ,", VALID, "objectives") == ["linear", "free_running"]
    assert pick_names(["exponential"], VALID, "objectives") == ["exponential"]


@pytest.mark.parametrize(
    "value, message",
    [
        (" , ", "objectives is empty; valid: linear, exponential, free_running"),
        ("linaer", "objectives: unknown 'linaer' \\(did you mean 'linear'\\?\\); valid: linear"),
        ("zzz", "objectives: unknown 'zzz'; valid"),
        (["linear", "linear"], "names one twice"),
    ],
)
def test_pick_names_says_what_is_wrong_and_what_is_valid(value, message):
    with pytest.raises(ConfigError, match=message):
        pick_names(value, VALID, "objectives")
