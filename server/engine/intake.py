"""From a `Request` to the `Sequence`s the scheduler runs, or a refusal saying what to change.

Everything a request can get wrong is found here, before it is queued, so nothing else is
affected: its sampling values; its prompt (exactly one of a text, chat turns or token ids; ids
inside the vocabulary; not empty); what it names (a LoRA adapter as `adapter`, a soft prompt as
`soft_prompt`, neither quarantined); and its length against the model's context and the KV
cache. Each sequence also gets its prefix-cache hashes, keyed by the registrations it applies.
Tokenizing only reads the tokenizer (and the size of a soft prompt), so fronts can `encode` off
the engine's thread.

A text is never tokenized whole just to learn that it is too long. Tokenizing costs about 2 s
of CPU per MiB, and eight callers sending 1 MiB prompts once raised a normal request's latency
from 0.19 s to 9.7 s. So, first, from the vocabulary (once, `token_span.py`): the most characters
and UTF-8 bytes of input one token can stand for (5 and 5 on the tests' tiny tokenizer, its
`<unk>`; 81 and 81 on SmolLM2, a newline and 80 spaces). A text longer than the prompt's token
budget (the context, less the soft prompt's virtual tokens and one new token) times either
cannot fit, and is refused without calling the tokenizer (SmolLM2: 8191 × 81 = 663,471
characters; a 1 MiB prompt never reaches it). Then a text within that size is tokenized by
growing prefixes (4 characters a token first, then doubling) and refused as soon as a prefix
alone is `PREFIX_MARGIN` tokens over the budget, so the tokenizer never reads more than twice
what proves a text too long (or four characters a token of budget). A text that fits is
tokenized whole (once more, where it was longer than the first prefix), exactly as before.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .adapter_slots import AdapterSlots
from .block_manager import BlockManager, prefix_hashes
from .detokenizer import IncrementalDetokenizer
from .sampler import make_generator
from .sequence import Request, Sequence
from .token_span import TokenSpan, token_span

FIRST_CHARS_PER_TOKEN = 4  # the first prefix tried: about one budget's worth of English
# A prefix cut inside a word or a run of spaces may tokenize to a few more tokens than the same
# characters inside the whole text (never more than 2 on the tiny and SmolLM2 tokenizers, over
# runs of letters, digits, spaces, newlines, CJK, emoji, random code points and special tokens:
# only the prefix's last pre-tokens differ). A prefix refuses only beyond budget + this margin.
PREFIX_MARGIN = 16
class RequestError(ValueError):
    """A request the engine refuses as given (the message says why); nothing else is affected."""


@dataclass(frozen=True)
class PromptBudget:
    """The tokens a prompt may have: the model's context less the soft prompt's virtual tokens and
    one new token."""

    context: int
    virtual: int = 0

    @property
    def tokens(self) -> int:
        return self.context - self.virtual - 1

    def context_phrase(self) -> str:
        soft = f"{self.virtual} for the soft prompt, " if self.virtual else ""
        return f"the model's context of {self.context} tokens ({soft}{self.tokens} for the prompt, 1 for a new token)"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _check_unicode(text: str, what: str) -> None:
    """Refuse a lone surrogate (JSON's "\\ud800" spells one): it is no character, and the
    tokenizer raises TypeError on it."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{what} is not valid Unicode: character {exc.start} is a lone surrogate "
                           f"(U+{ord(text[exc.start]):04X}); send text, not half of a UTF-16 pair") from None


def _check_scoring(request: Request, num_prompt: int) -> None:
    """A scoring request scores at least one token after at least one of context."""
    start = request.score_from
    if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start < num_prompt:
        raise RequestError(f"score_from must be an index in [1, {num_prompt - 1}] of the prompt's {num_prompt} "
                           f"tokens (the first token scored; at least one comes before it), got {start!r}")
    if request.params.n != 1:
        raise RequestError(f"a scoring request scores one continuation; n must be 1, got {request.params.n}")


class Intake:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, slots: AdapterSlots, blocks: BlockManager,
                 prefix_caching: bool) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.slots = slots
        self.blocks = blocks
        self.prefix_caching = prefix_caching
        self.span = token_span(tokenizer)  # None: only the prefixes bound what the tokenizer reads

    def sibling(self, first: Sequence, index: int) -> Sequence:
        """Completion `index` of `first`'s request: the same prompt, its own generator and text.
        It shares the prompt's KV blocks that `first` computes (see scheduler.py)."""
        params = first.params
        sibling = Sequence(first.request_id, first.prompt_ids, params, first.adapter, first.soft_prompt,
                           make_generator(params.seed_for(index)),
                           IncrementalDetokenizer(self.tokenizer, first.prompt_ids, tuple(params.stop)), index=index)
        sibling.leader = first
        sibling.soft_prompt_name = first.soft_prompt_name
        sibling.prefix_hashes = first.prefix_hashes
        return sibling

    def sequence(self, request: Request, request_id: str, in_flight: bool) -> Sequence:
        """The first (or only) sequence of `request`, under `request_id`; `in_flight`: that id is
        already taken. Raises RequestError or AdapterQuarantined when it cannot run as given."""
        try:
            request.params.validate()
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        if in_flight:
            raise RequestError(f"request id {request_id!r} is already in flight")
        prompt_ids = self.prompt_ids(request)
        if request.adapter is not None and self.slots.kind(request.adapter) != "lora":
            if self.slots.kind(request.adapter) == "soft_prompt":
                raise RequestError(f"{request.adapter!r} is a soft prompt, not a LoRA adapter; pass it as soft_prompt")
            raise RequestError(f"unknown LoRA adapter {request.adapter!r}")
        soft = None
        if request.soft_prompt is not None:
            if self.slots.kind(request.soft_prompt) == "lora":
                raise RequestError(f"{request.soft_prompt!r} is a LoRA adapter, not a soft prompt; pass it as adapter")
            if self.slots.kind(request.soft_prompt) != "soft_prompt":
                raise RequestError(f"unknown soft prompt {request.soft_prompt!r}")
            soft = self.slots.soft_prompts[request.soft_prompt].embeddings
        for name in (request.adapter, request.soft_prompt):
            if name is not None:
                self.slots.check_servable(name)  # AdapterQuarantined: FAILED_PRECONDITION
        virtual = 0 if soft is None else soft.shape[0]
        if request.score_from is not None:
            _check_scoring(request, len(prompt_ids))
            request.params = dataclasses.replace(request.params, max_new_tokens=1)  # none is generated
        room = self.max_model_len - virtual - len(prompt_ids)
        if request.fit_max_new_tokens and 1 <= room < request.params.max_new_tokens:
            request.params = dataclasses.replace(request.params, max_new_tokens=room)
        total = virtual + len(prompt_ids) + request.params.max_new_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens"
                + (f" plus {virtual} soft-prompt tokens" if virtual else "")
                + f" plus max_new_tokens {request.params.max_new_tokens} is {total} tokens, "
                f"beyond the model's context of {self.max_model_len}"
            )
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if total > capacity:
            raise RequestError(f"request needs {total} tokens of KV cache, the server holds {capacity}")
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, tuple(request.params.stop))
        seq = Sequence(request_id, prompt_ids, request.params, request.adapter, soft,
                       make_generator(request.params.seed), detok)
        seq.soft_prompt_name = request.soft_prompt
        seq.score_from = request.score_from
        if self.prefix_caching:
            key = self.slots.cache_key(request.adapter) + "|" + self.slots.cache_key(request.soft_prompt)
            full = (seq.num_prompt_positions - 1) // self.blocks.block_size  # the last position is computed
            if seq.score_from is not None:  # cached positions give no logits: none from the first scored
                full = min(full, (virtual + seq.score_from - 1) // self.blocks.block_size)
            seq.prefix_hashes = prefix_hashes(seq.chunk_ids(0, seq.num_prompt_positions), self.blocks.block_size,
                                              full, key)
        return seq

    def encode(self, request: Request) -> Request:
        """The request with its prompt or chat turned into token ids. Safe to call from another
        thread (it reads only the tokenizer and a soft prompt's size), so fronts tokenize off the
        engine's thread."""
        if request.continuation is not None:
            return self._with_continuation(request)
        if request.prompt_token_ids is not None:
            return request
        return dataclasses.replace(request, prompt=None, messages=None, prompt_token_ids=self.prompt_ids(request))

    def _with_continuation(self, request: Request) -> Request:
        """A scoring request: the prompt's ids, then the continuation's, scored from the first of them."""
        if request.score_from is not None or not isinstance(request.continuation, str):
            raise RequestError("give a continuation (a string) or score_from, not both")
        ids = self.prompt_ids(request)
        budget = PromptBudget(self.max_model_len - len(ids), self._virtual_tokens(request.soft_prompt))
        more = self._bounded_ids(request.continuation, budget, "the continuation", add_special_tokens=False)
        if not more:
            raise RequestError("the continuation is empty: nothing to score")
        return dataclasses.replace(request, prompt=None, messages=None, continuation=None,
                                   prompt_token_ids=ids + more, score_from=len(ids))

    def prompt_ids(self, request: Request) -> list[int]:
        """The request's prompt as token ids: a text prompt through `tokenizer(text)`, a chat through
        the chat template with the generation prompt added, token ids as given (checked). A text
        that cannot fit the context is refused having read at most what proves it (see above)."""
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_token_ids)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, messages or prompt_token_ids")
        budget = PromptBudget(self.max_model_len, self._virtual_tokens(request.soft_prompt))
        if request.prompt is not None:
            if not isinstance(request.prompt, str):
                raise RequestError("prompt must be a string")
            ids = self._bounded_ids(request.prompt, budget, "the prompt")
        elif request.messages is not None:
            ids = self._chat_ids(request.messages, budget)
        else:
            ids = list(request.prompt_token_ids)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if not ids:
            raise RequestError("the prompt is empty")
        return list(ids)

    def _virtual_tokens(self, soft_prompt: str | None) -> int:
        """The soft prompt's virtual tokens, 0 for none or a name that is not one (refused later).
        One dict lookup, atomic, so another thread may ask while the engine registers adapters."""
        entry = self.slots.soft_prompts.get(soft_prompt) if soft_prompt is not None else None
        return 0 if entry is None else int(entry.embeddings.shape[0])

    def _chat_ids(self, messages: list[dict], budget: PromptBudget) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if not self.tokenizer.chat_template:
            raise RequestError("this model has no chat template; send a prompt instead of messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._bounded_ids(text, budget, "the chat (its template applied)", add_special_tokens=False)

    def _bounded_ids(self, text: str, budget: PromptBudget, what: str, **kwargs) -> list[int]:
        """`tokenizer(text, **kwargs)["input_ids"]`, unless `text` cannot fit `budget`: refused by
        its size unread, or by the first growing prefix that is already too many tokens."""
        if budget.tokens < 1:
            raise RequestError(f"no prompt fits {budget.context_phrase()}; use a shorter soft prompt")
        self._check_size(text, budget, what)
        _check_unicode(text, what)
        chars = budget.tokens * FIRST_CHARS_PER_TOKEN
        while chars < len(text):
            count = len(self.tokenizer(text[:chars], **kwargs)["input_ids"])
            if count > budget.tokens + PREFIX_MARGIN:
                raise RequestError(f"{what} is longer than {budget.tokens} tokens (its first {chars} characters "
                                   f"are {count} tokens), beyond {budget.context_phrase()}; shorten it")
            chars *= 2
        ids = self.tokenizer(text, **kwargs)["input_ids"]
        if len(ids) > budget.tokens:
            raise RequestError(f"{what} is {len(ids)} tokens, beyond {budget.context_phrase()}; shorten it")
        return ids

    def _check_size(self, text: str, budget: PromptBudget, what: str) -> None:
        """Refuse `text` when it is longer than `budget` tokens of the longest kind could be."""
        if self.span is None:
            return
        limit = budget.tokens * self.span.chars
        if len(text) > limit:
            raise RequestError(f"{what} has {len(text)} characters, beyond {budget.context_phrase()}: "
                               f"{budget.tokens} tokens hold at most {limit} characters, {self.span.chars} a token; "
                               f"shorten it")
        limit = budget.tokens * self.span.bytes
        size = _utf8_len(text) if len(text) * 4 > limit else 0  # 4 bytes a character at most
        if size > limit:
            raise RequestError(f"{what} is {size} bytes of UTF-8, beyond {budget.context_phrase()}: "
                               f"{budget.tokens} tokens hold at most {limit} bytes, {self.span.bytes} a token; "
                               f"shorten it")
