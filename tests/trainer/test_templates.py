"""Instruction templates: FLAN-style phrasings, and the served template that reproduces training prompts."""
from __future__ import annotations

import pytest

from loraplex.adapters_store.endpoints import check_template, render_template
from loraplex.trainer.templates import TemplateError, load_template, parse_template, render, served_template


def test_builtin_flan_has_several_phrasings_drawn_per_example():
    flan = load_template("flan")
    assert len(flan.phrasings) >= 5
    picks = [flan.pick(seed=0, index=i) for i in range(200)]
    assert set(picks) == set(flan.phrasings)  # every phrasing gets used
    assert picks == [flan.pick(seed=0, index=i) for i in range(200)]  # and the draw is reproducible
    assert picks != [flan.pick(seed=1, index=i) for i in range(200)]


@pytest.mark.parametrize("instruction", ["Reverse the words.", "Answer in JSON like {\"a\": 1}.", "Use }{ braces"])
def test_served_template_reproduces_every_training_prompt(instruction):
    """The endpoint template (only {input} open, endpoint rules) renders exactly the prompt trained on."""
    for phrasing in load_template("flan").phrasings + ("Literal {{braces}}: {instruction} -> {input}",):
        served = served_template(phrasing, instruction)
        check_template(served)  # the registry accepts it
        for text in ("fox dog", "a {weird} input"):
            assert render_template(served, text) == render(phrasing, instruction, text)


def test_user_template_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# comment\nQ: {instruction}\n{input}\n%%\n{input}\n=> {instruction}\n", encoding="utf-8")
    tmpl = load_template(str(path))
    assert tmpl.phrasings == ("Q: {instruction}\n{input}", "{input}\n=> {instruction}")
    assert tmpl.served == "Q: {instruction}\n{input}"


@pytest.mark.parametrize("text, message", [
    ("{instruction} {input}\n%%\n{input} only", "phrasing 2: a phrasing needs {instruction} and {input}"),
    ("{instruction} {input} {output}", "unknown field {output}"),
    ("{instruction {input}", "write literal braces"),
    ("{instruction} {input}\n%%\n\n", "phrasing 2: empty phrasing"),
])
def test_bad_templates_are_refused_by_phrasing(text, message):
    with pytest.raises(TemplateError) as err:
        parse_template(text, "t")
    assert str(err.value).startswith("template t, phrasing ")
    assert message in str(err.value)


def test_unknown_template_name():
    with pytest.raises(TemplateError, match="built-in: flan, plain"):
        load_template("nope")
