from __future__ import annotations

import pytest

from loraplex.adapters_store import NAME_PATTERN, StoreError, format_ref, parse_ref, validate_name


@pytest.mark.parametrize("name", ["a", "A", "0", "sql-gen", "v1.2_final", "x" * 128, "a..b", "a-"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        (".", "must start with an ASCII letter or digit"),
        ("..", "must start with an ASCII letter or digit"),
        ("../x", "must start with an ASCII letter or digit"),
        (".hidden", "must start with an ASCII letter or digit"),
        ("-rf", "must start with an ASCII letter or digit"),
        ("_x", "must start with an ASCII letter or digit"),
        ("x" * 129, "129 characters long; the limit is 128"),
        ("", "must not be empty"),
        ("modèle", "contains 'è'"),
        ("ünicode", "starts with 'ü'"),
        ("a/b", "contains '/'"),
        ("a b", "contains ' '"),
        ("a@1", "contains '@'"),
        ("a\n", "contains '\\n'"),
    ],
)
def test_invalid_names_name_the_rule(name, rule):
    with pytest.raises(StoreError) as info:
        validate_name(name, "endpoint")
    assert info.value.code == "invalid"
    assert rule in str(info.value)
    assert "endpoint name" in str(info.value)
    assert NAME_PATTERN in str(info.value)


def test_non_string_name_is_invalid():
    with pytest.raises(StoreError, match="must be a string"):
        validate_name(3)  # type: ignore[arg-type]


def test_parse_and_format_ref():
    assert parse_ref("sql") == ("sql", None)
    assert parse_ref("sql@3") == ("sql", 3)
    assert parse_ref("a.b-c@12") == ("a.b-c", 12)
    assert format_ref("sql", 3) == "sql@3"
    assert parse_ref(format_ref("x", 7)) == ("x", 7)


@pytest.mark.parametrize("ref", ["sql@", "sql@0", "sql@-1", "sql@+1", "sql@x", "sql@01", "sql@1@2", "sql@1.0"])
def test_bad_versions_are_invalid(ref):
    with pytest.raises(StoreError) as info:
        parse_ref(ref)
    assert info.value.code == "invalid"
    assert "version" in str(info.value)


@pytest.mark.parametrize("ref", ["@1", "../x@1", ""])
def test_bad_names_in_refs_are_invalid(ref):
    with pytest.raises(StoreError) as info:
        parse_ref(ref)
    assert info.value.code == "invalid"


def test_store_error_rejects_unknown_codes():
    with pytest.raises(ValueError):
        StoreError("boom", "x")
