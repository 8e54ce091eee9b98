"""A text too long for the model's context is refused having read at most what proves it.

The engine's tokenizer is wrapped in a spy that records every text it is called on, so each test
states exactly what the tokenizer read: nothing for a text larger than its token budget times
the most characters (or UTF-8 bytes) one token stands for, at most a growing prefix for a text
within that size but too many tokens, and the whole text (tokenized exactly as before) for one
that fits. The tiny model's context is 256 tokens, so a prompt's budget is 255 (one new token),
and its longest token is `<unk>`, 5 characters: at most 1275 characters can fit.
"""
from __future__ import annotations

import random

import pytest

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.intake import FIRST_CHARS_PER_TOKEN, PREFIX_MARGIN, RequestError
from loraplex.server.engine.token_span import TokenSpan
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

BUDGET = 255  # the tiny model's 256 positions, less one new token
MOST = BUDGET * 5  # characters (and bytes) that can fit at 5 a token


class TokenizerSpy:
    """The engine's tokenizer, recording every text it is called on."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.inputs: list[str] = []

    def __call__(self, text, *args, **kwargs):
        self.inputs.append(text)
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def longest(self) -> int:
        return max((len(t) for t in self.inputs), default=0)


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_adapters) -> Engine:
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=2048))
    engine.register_adapter("soft", str(tiny_adapters["soft"]))  # 5 virtual tokens
    return engine


@pytest.fixture
def spy(engine):
    real = engine.intake.tokenizer
    engine.intake.tokenizer = TokenizerSpy(real)
    yield engine.intake.tokenizer
    engine.intake.tokenizer = real


def refusal(engine: Engine, **request) -> str:
    with pytest.raises(RequestError) as info:
        engine.encode(Request(**request))
    return str(info.value)


def test_the_span_is_the_longest_token_decoded(engine):
    """The bound read from the vocabulary covers every token decoded on its own, and is reached."""
    tok = engine.tokenizer
    decoded = [tok.decode([i], skip_special_tokens=False) for i in range(len(tok))]
    assert engine.intake.span == TokenSpan(chars=5, bytes=5)
    assert max(len(d) for d in decoded) == 5 and max(len(d.encode()) for d in decoded) == 5


def test_a_1_mib_prompt_is_refused_unread(engine, spy):
    message = refusal(engine, prompt="a" * (1 << 20))
    assert message == ("the prompt has 1048576 characters, beyond the model's context of 256 tokens (255 for the "
                       "prompt, 1 for a new token): 255 tokens hold at most 1275 characters, 5 a token; shorten it")
    assert spy.inputs == []
    # the engine's own path (offline generate tokenizes on its thread) refuses it alike
    [done] = engine.generate([Request(prompt="a" * (1 << 20), params=SamplingParams(max_new_tokens=1))])
    assert done.error == message and spy.inputs == []


def test_a_prompt_of_the_longest_tokens_just_over_the_limit_is_refused_unread(engine, spy):
    text = "<unk>" * (BUDGET + 1)  # 256 tokens of 5 characters: 1280 characters
    assert len(engine.tokenizer(text)["input_ids"]) == BUDGET + 1
    assert "the prompt has 1280 characters, beyond" in refusal(engine, prompt=text)
    assert spy.inputs == []


def test_multibyte_text_is_refused_by_its_utf8_size_unread(engine, spy):
    text = "é" * 700  # 700 characters fit the character bound; 1400 bytes do not fit 1275
    assert refusal(engine, prompt=text) == (
        "the prompt is 1400 bytes of UTF-8, beyond the model's context of 256 tokens (255 for the prompt, 1 for a "
        "new token): 255 tokens hold at most 1275 bytes, 5 a token; shorten it")
    assert spy.inputs == []


def test_a_soft_prompt_takes_its_tokens_from_the_budget(engine, spy):
    text = "a" * (MOST - 24)  # 1251 characters: over 250 tokens of 5, within 255
    assert refusal(engine, prompt=text, soft_prompt="soft") == (
        "the prompt has 1251 characters, beyond the model's context of 256 tokens (5 for the soft prompt, 250 for "
        "the prompt, 1 for a new token): 250 tokens hold at most 1250 characters, 5 a token; shorten it")
    assert spy.inputs == []
    assert "longer than 255 tokens" in refusal(engine, prompt=text)  # without it the size may fit


def _needed(tokenizer, text: str, **kwargs) -> int:
    """The shortest prefix of `text` that is more tokens than the budget and its margin."""
    for n in range(1, len(text) + 1):
        if len(tokenizer(text[:n], **kwargs)["input_ids"]) > BUDGET + PREFIX_MARGIN:
            return n
    raise AssertionError("the text is not too long")


def _random_words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij   ") for _ in range(n))


@pytest.mark.parametrize("text", ["a" * MOST, " the" * 318, "<unk>" * 200 + "a" * 275, _random_words(MOST, 1),
                                  "ab" * 637], ids=["letters", "words", "long-then-short", "random", "pairs"])
def test_too_many_tokens_are_refused_from_a_prefix(engine, spy, text):
    """Within the size bound but over the budget: refused from a prefix, never tokenized whole,
    and no input longer than twice the proof (or the first guess, 4 characters a token)."""
    assert len(text) <= MOST and len(engine.tokenizer(text)["input_ids"]) > BUDGET
    message = refusal(engine, prompt=text)
    assert message.startswith("the prompt is "), message
    assert message.endswith(" tokens), beyond the model's context of 256 tokens (255 for the prompt, 1 for a new "
                            "token); shorten it") or message.endswith(" tokens, beyond the model's context of 256 "
                                                                     "tokens (255 for the prompt, 1 for a new token); "
                                                                     "shorten it"), message
    assert spy.inputs and spy.longest() <= max(FIRST_CHARS_PER_TOKEN * BUDGET, 2 * _needed(engine.tokenizer, text))


@pytest.mark.parametrize("text", ["hello world", "the quick brown fox " * 12, "<unk>" * BUDGET, "<unk>" * 250 + "hi",
                                  _random_words(240, 2), "x" * BUDGET, "中文" * 20],
                         ids=["short", "sentence", "exactly-full", "past-first-prefix", "random", "one-char-tokens",
                              "cjk"])
def test_a_prompt_that_fits_is_tokenized_exactly_as_before(engine, spy, text):
    expected = engine.tokenizer(text)["input_ids"]
    assert len(expected) <= BUDGET
    assert engine.encode(Request(prompt=text)).prompt_token_ids == expected
    assert spy.inputs[-1] == text and spy.longest() == len(text)
    [done] = engine.generate([Request(prompt=text, params=SamplingParams(max_new_tokens=1, ignore_eos=True))])
    assert done.error is None and done.prompt_tokens == len(expected) and len(done.token_ids) == 1


def test_the_exactly_full_prompt_takes_the_growing_prefixes(engine, spy):
    engine.encode(Request(prompt="<unk>" * BUDGET))
    assert [len(t) for t in spy.inputs] == [FIRST_CHARS_PER_TOKEN * BUDGET, MOST]


def _chat(contents: list[str]) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


def test_a_long_chat_is_refused_by_its_size_unread(engine, spy):
    messages = _chat(["the quick brown fox " * 50] * 40)  # 40,000 characters of content
    message = refusal(engine, messages=messages)
    assert message.startswith("the chat (its template applied) has "), message
    assert "beyond the model's context of 256 tokens (255 for the prompt, 1 for a new token): 255 tokens hold at " \
           "most 1275 characters" in message
    assert spy.inputs == []


def test_a_chat_too_many_tokens_is_refused_from_a_prefix(engine, spy):
    messages = _chat(["a" * 100] * 10)
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert len(text) <= MOST
    assert refusal(engine, messages=messages).startswith("the chat (its template applied) is longer than 255 tokens")
    assert text not in spy.inputs and spy.longest() <= max(FIRST_CHARS_PER_TOKEN * BUDGET,
                                2 * _needed(engine.tokenizer, text, add_special_tokens=False))


@pytest.mark.parametrize("contents", [["hello"], ["list the users", "SELECT name FROM users;", "and their ids?"],
                                      ["<unk>" * 50] * 4])
def test_a_chat_that_fits_is_tokenized_exactly_as_before(engine, spy, contents):
    messages = _chat(contents)
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert engine.encode(Request(messages=messages)).prompt_token_ids == expected
    assert spy.inputs[-1] == text and spy.longest() == len(text)
