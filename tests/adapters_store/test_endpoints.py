from __future__ import annotations

import dataclasses

import pytest

from loraplex.adapters_store import AdapterStore, EndpointRecord, StoreError
from loraplex.adapters_store.endpoints import check_template, render_template


@pytest.fixture
def loaded(store, tiny_adapters, validate) -> AdapterStore:
    """sql@1 (attn4), sql@2 (mlp8), persona@1 (soft prompt)."""
    store.publish_dir("sql", tiny_adapters["attn4"], validate)
    store.publish_dir("sql", tiny_adapters["mlp8"], validate)
    store.publish_dir("persona", tiny_adapters["soft"], validate)
    return store


def code_of(call) -> tuple[str, str]:
    with pytest.raises(StoreError) as info:
        call()
    return info.value.code, str(info.value)


def test_create_resolves_names_to_the_latest_version_at_save_time(loaded, tiny_adapters, validate):
    ep = loaded.create_endpoint(EndpointRecord(
        "text2sql", adapter="sql", soft_prompt="persona", template="Q: {input}\nSQL:",
        defaults={"temperature": 0, "stop": ("\n\n",), "seed": None}, max_new_tokens_cap=128,
    ))
    assert (ep.adapter, ep.soft_prompt) == ("sql@2", "persona@1")
    assert ep.defaults == {"temperature": 0.0, "stop": ["\n\n"]}
    assert ep.created_at == ep.updated_at > 0
    loaded.publish_dir("sql", tiny_adapters["rs2"], validate)
    assert loaded.get_endpoint("text2sql") == ep
    assert loaded.list_endpoints() == [ep]


def test_exact_refs_must_exist(loaded):
    assert loaded.create_endpoint(EndpointRecord("e", adapter="sql@1")).adapter == "sql@1"
    code, msg = code_of(lambda: loaded.create_endpoint(EndpointRecord("f", adapter="sql@9")))
    assert code == "not_found" and "endpoint 'f': adapter 'sql@9'" in msg and "its versions are 1, 2" in msg
    code, msg = code_of(lambda: loaded.create_endpoint(EndpointRecord("f", soft_prompt="ghost")))
    assert code == "not_found" and "soft prompt 'ghost'" in msg


def test_kind_mismatches_are_refused(loaded):
    for rec in (EndpointRecord("e", adapter="persona"), EndpointRecord("e", soft_prompt="sql"),
                EndpointRecord("e", adapter="sql@1", canary_adapter="persona", canary_weight=0.5)):
        code, msg = code_of(lambda: loaded.create_endpoint(rec))
        assert code == "invalid"
        assert "adapter; this field takes a" in msg
    assert loaded.list_endpoints() == []


def test_duplicate_create_is_already_exists(loaded):
    loaded.create_endpoint(EndpointRecord("e", adapter="sql"))
    assert code_of(lambda: loaded.create_endpoint(EndpointRecord("e")))[0] == "already_exists"


def test_endpoint_without_adapters_is_allowed(loaded):
    ep = loaded.create_endpoint(EndpointRecord("plain", system_message="Be brief."))
    assert (ep.adapter, ep.soft_prompt, ep.system_message) == (None, None, "Be brief.")


def test_update_switches_version_and_keeps_created_at(loaded):
    old = loaded.create_endpoint(EndpointRecord("e", adapter="sql@1", template="{input}"))
    new = loaded.update_endpoint(EndpointRecord("e", adapter="sql", defaults={"top_k": 5}))
    assert new.adapter == "sql@2"
    assert new.created_at == old.created_at and new.updated_at >= old.updated_at
    assert new.template == "" and new.defaults == {"top_k": 5}
    assert loaded.get_endpoint("e") == new


def test_update_is_all_or_nothing(loaded):
    before = loaded.create_endpoint(EndpointRecord("e", adapter="sql@1"))
    with pytest.raises(StoreError):
        loaded.update_endpoint(EndpointRecord("e", adapter="sql@2", soft_prompt="sql@1"))
    assert loaded.get_endpoint("e") == before


def test_missing_endpoint_is_not_found(loaded):
    assert code_of(lambda: loaded.update_endpoint(EndpointRecord("ghost")))[0] == "not_found"
    assert code_of(lambda: loaded.get_endpoint("ghost"))[0] == "not_found"
    assert code_of(lambda: loaded.delete_endpoint("ghost"))[0] == "not_found"


def test_canary(loaded):
    ep = loaded.create_endpoint(EndpointRecord("e", adapter="sql@1", canary_adapter="sql", canary_weight=0.1))
    assert (ep.adapter, ep.canary_adapter, ep.canary_weight) == ("sql@1", "sql@2", 0.1)
    bad = [
        (EndpointRecord("f", canary_adapter="sql@1", canary_weight=0.5), "needs an adapter"),
        (EndpointRecord("f", adapter="sql@1", canary_adapter="sql@2", canary_weight=1.0), "strictly between 0 and 1"),
        (EndpointRecord("f", adapter="sql@1", canary_adapter="sql@2", canary_weight=0), "strictly between 0 and 1"),
        (EndpointRecord("f", adapter="sql@1", canary_weight=0.2), "no canary_adapter"),
        (EndpointRecord("f", adapter="sql@2", canary_adapter="sql", canary_weight=0.5), "both sql@2"),
    ]
    for rec, fragment in bad:
        code, msg = code_of(lambda: loaded.create_endpoint(rec))
        assert code == "invalid" and fragment in msg


@pytest.mark.parametrize("template", ["{input}", "Q: {input}\nA:", 'JSON {{"q": "{input}"}}', "{input} }} {{"])
def test_valid_templates(template):
    check_template(template)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("no slot", "exactly one {input} slot, found 0"),
        ("{input} and {input}", "exactly one {input} slot, found 2"),
        ("{name}: {input}", "'{name}'"),
        ("{}{input}", "'{}'"),
        ("{input!r}", "'{input!r}'"),
        ("{input:>10}", "'{input:>10}'"),
        ("{input.upper}", "'{input.upper}'"),
        ("{input} {", "unmatched brace"),
        ("{input} }", "unmatched brace"),
    ],
)
def test_invalid_templates(template, fragment):
    with pytest.raises(StoreError) as info:
        check_template(template)
    assert info.value.code == "invalid" and fragment in str(info.value)


def test_render_template():
    assert render_template("", "x {y}") == "x {y}"
    assert render_template('{{"q": "{input}"}}', "a {b} }") == '{"q": "a {b} }"}'


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"defaults": {"beam_width": 4}}, "unknown default sampling field(s) ['beam_width']"),
        ({"defaults": {"temperature": -1}}, "temperature must be >= 0"),
        ({"defaults": {"temperature": float("nan")}}, "temperature must be finite"),
        ({"defaults": {"top_p": 0}}, "top_p must be in (0, 1]"),
        ({"defaults": {"top_k": -1}}, "top_k must be >= 0"),
        ({"defaults": {"max_new_tokens": True}}, "max_new_tokens must be an integer"),
        ({"defaults": {"seed": 2**63}}, "seed must be in [0, 9223372036854775808)"),
        ({"defaults": {"stop": "END"}}, "stop must be a list of strings"),
        ({"defaults": {"stop": ["ok", ""]}}, "stop[1] must be a non-empty string"),
        ({"defaults": {"ignore_eos": 1}}, "ignore_eos must be a bool"),
        ({"max_new_tokens_cap": 0}, "max_new_tokens_cap must be >= 1"),
        ({"max_new_tokens_cap": 8, "defaults": {"max_new_tokens": 9}}, "exceeds max_new_tokens_cap 8"),
        ({"name": "-e"}, "invalid endpoint name '-e'"),
        ({"adapter": "sql@0"}, "invalid adapter reference"),
        ({"template": 3}, "template must be a string"),
        ({"system_message": "x" * 70000}, "the limit is 65536"),
    ],
)
def test_invalid_endpoint_fields(loaded, changes, fragment):
    rec = dataclasses.replace(EndpointRecord("e"), **changes)
    with pytest.raises(StoreError) as info:
        loaded.create_endpoint(rec)
    assert info.value.code == "invalid"
    assert fragment in str(info.value)


def test_all_sampling_defaults_round_trip(tmp_path, tiny_adapters, validate):
    defaults = {"max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7,
                "stop": ["</s>", "\n"], "ignore_eos": True}
    with AdapterStore(tmp_path / "s") as s:
        s.publish_dir("sql", tiny_adapters["attn4"], validate)
        s.publish_dir("sql", tiny_adapters["mlp8"], validate)
        s.publish_dir("persona", tiny_adapters["soft"], validate)
        saved = s.create_endpoint(EndpointRecord(
            "e", adapter="sql@2", soft_prompt="persona", template="{input}", system_message="sys",
            defaults=defaults, max_new_tokens_cap=64, canary_adapter="sql@1", canary_weight=0.25,
        ))
        assert saved.defaults == defaults
    with AdapterStore(tmp_path / "s") as reopened:
        assert reopened.list_endpoints() == [saved]


def test_delete_endpoint_returns_it(loaded):
    ep = loaded.create_endpoint(EndpointRecord("e", adapter="sql"))
    assert loaded.delete_endpoint("e") == ep
    assert loaded.list_endpoints() == []
