import pytest

from hub.errors import InvalidName
from hub.names import ModelRef, parse_adapter_ref, validate_name


@pytest.mark.parametrize("name", ["a", "support-bot", "x1.v2_b", "0abc", "a" * 64])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A", "-a", ".a", "_a", "a/b", "../x", "a..b", "a b", "é", "a" * 65, "a\0b"]
)
def test_invalid_names_name_the_value_and_the_rule(name):
    with pytest.raises(InvalidName) as err:
        validate_name(name)
    assert "Invalid adapter name" in str(err.value)
    assert "lower-case letters" in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smollm2", ModelRef("smollm2")),
        ("smollm2+bot", ModelRef("smollm2", "bot")),
        ("smollm2+bot@3", ModelRef("smollm2", "bot", 3)),
        ("smollm2+bot@v12", ModelRef("smollm2", "bot", 12)),
    ],
)
def test_model_ref_parse_round_trip(text, expected):
    ref = ModelRef.parse(text)
    assert ref == expected
    assert ModelRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text", ["", "+bot", "smollm2+", "smollm2+../../etc", "smollm2+bot@0", "smollm2+bot@x",
             "smollm2+bot@-1", "Smollm2", "smollm2+bot+x", "x" * 300]
)
def test_model_ref_rejects(text):
    with pytest.raises(InvalidName):
        ModelRef.parse(text)


def test_parse_adapter_ref():
    assert parse_adapter_ref("bot") == ("bot", None)
    assert parse_adapter_ref("bot@2") == ("bot", 2)
