"""Incremental detokenization with stop strings, for streaming.

Decoding the whole generation after every token is O(length) per token. Instead we keep a
small window of recent ids split by two offsets (the technique used by vLLM and TGI):

    window:  [ ... prefix_offset ... read_offset ... end ]
              `- context, already emitted -'`- new -'

``decode(window[prefix:read])`` is text already emitted, kept only as left context so that
word-initial spaces and multi-token characters decode exactly as they would in the full
sequence; ``decode(window[prefix:])`` minus that prefix is the new text. While the new text
ends in U+FFFD the last token holds an incomplete multi-byte character, so nothing is
emitted until a later token completes it.

Decoded text then goes through the stop-string filter: text is released only once it can
no longer be part of a stop string, i.e. we hold back the longest suffix that is a prefix
of some stop string. Anything released is final and never retracted.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

from transformers import PreTrainedTokenizerBase

# Prompt ids kept as left context for the first generated tokens.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into final text deltas.

    Stop semantics: generation stops as soon as any stop string is complete in the decoded
    text. When one step completes several, the one ending first wins (ties: the longest).
    The stop string itself is never part of ``text``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._skip_special_tokens = skip_special_tokens

        # Window of recent ids: a few prompt ids as left context, then generated ids.
        self._window: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._window)

        self._generated: list[int] = []
        # For each generated id whose text is settled: the decoded length once it is in.
        # Used to cut token_ids at a stop string.
        self._token_ends: list[int] = []
        self._decoded_len = 0  # characters decoded so far, before stop handling
        self._chunks: list[str] = []  # released (final) text
        self._released_len = 0
        self._held = ""  # decoded text that may be the start of a stop string
        self._kept_ids: int | None = None  # on stop: how many ids lie before the stop
        self._flushed = False
        self.stopped = False

    # ------------------------------------------------------------------ public API

    @property
    def text(self) -> str:
        """All final text so far; on stop, everything before the stop string."""
        return "".join(self._chunks)

    @property
    def token_ids(self) -> list[int]:
        """Generated ids; on stop, only those whose text lies entirely before the stop."""
        if self._kept_ids is not None:
            return self._generated[: self._kept_ids]
        return list(self._generated)

    @property
    def num_final_ids(self) -> int:
        """How many generated ids have all their text in ``text`` (a stream sends ids up to here,
        so ids of a stop string being matched are never sent)."""
        if self._kept_ids is not None:
            return self._kept_ids
        return bisect_right(self._token_ends, self._released_len)

    def add(self, token_id: int) -> str:
        """Append one generated token and return the newly final text ("" if none)."""
        if self.stopped or self._flushed:
            raise RuntimeError("add() after the detokenizer stopped or was flushed")
        self._generated.append(token_id)
        self._window.append(token_id)

        new_text = self._decode_new(allow_incomplete=False)
        if not new_text:
            return ""
        return self._release(new_text)

    def flush(self) -> str:
        """At the end of generation (length or eos): release everything still held back.

        Text that only now decodes (a trailing incomplete character, kept as U+FFFD like a
        full decode does) is still checked for stop strings.
        """
        if self.stopped or self._flushed:
            return ""
        self._flushed = True
        out = ""
        new_text = self._decode_new(allow_incomplete=True)
        if new_text:
            out = self._release(new_text)
        if not self.stopped and self._held:
            out += self._held
            self._chunks.append(self._held)
            self._released_len += len(self._held)
            self._held = ""
        return out

    # ------------------------------------------------------------------ decoding

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, allow_incomplete: bool) -> str:
        """Text added by the ids past read_offset; "" while it ends mid-character (unless
        allow_incomplete). Settles those ids and slides the window when it returns."""
        if self._read_offset == len(self._window):
            return ""
        prefix_text = self._decode(self._window[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._window[self._prefix_offset :])
        if full_text.endswith(_REPLACEMENT_CHAR) and not allow_incomplete:
            return ""

        new_text = full_text[len(prefix_text) :]
        settled = len(self._window) - self._read_offset
        self._decoded_len += len(new_text)
        self._token_ends.extend([self._decoded_len] * settled)

        # Tokens that produced no text (e.g. skipped special tokens) join the context
        # instead of replacing it, so the next token still sees real left context.
        if new_text:
            self._prefix_offset = self._read_offset
        self._read_offset = len(self._window)
        self._trim_window()
        return new_text

    def _trim_window(self) -> None:
        """Drop ids left of prefix_offset: they are never decoded again."""
        if self._prefix_offset:
            del self._window[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    # ------------------------------------------------------------------ stop strings

    def _release(self, new_text: str) -> str:
        """Run newly decoded text through the stop filter; return what becomes final.

        Any stop string not yet seen must start inside held + new_text: everything released
        earlier was, by construction, not the start of a stop string.
        """
        pending = self._held + new_text
        match = self._find_stop(pending)
        if match is not None:
            out = pending[:match]
            self._held = ""
            self.stopped = True
            stop_at = self._decoded_len - len(pending) + match  # position in the full text
            self._kept_ids = sum(1 for end in self._token_ends if end <= stop_at)
        else:
            keep = self._held_suffix_len(pending)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if out:
            self._chunks.append(out)
            self._released_len += len(out)
        return out

    def _find_stop(self, text: str) -> int | None:
        """Start of the stop string that completes first in text (ties: the longest)."""
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stop:
            start = text.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else best[1]

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
