"""From a `Request` to the `Sequence`s the scheduler runs, or a refusal saying what to change.

Everything a request can get wrong is found here, before it is queued, so nothing else is
affected: its sampling values; its prompt (exactly one of a text, chat turns or token ids; ids
inside the vocabulary; not empty); what it names (a LoRA adapter as `adapter`, a soft prompt as
`soft_prompt`, neither quarantined); and its length against the model's context and the KV
cache. Each sequence also gets its prefix-cache hashes, keyed by the registrations it applies.
Tokenizing only reads the tokenizer, so fronts can `encode` off the engine's thread.
"""
from __future__ import annotations

import dataclasses

from .adapter_slots import AdapterSlots
from .block_manager import BlockManager, prefix_hashes
from .detokenizer import IncrementalDetokenizer
from .sampler import make_generator
from .sequence import Request, Sequence


class RequestError(ValueError):
    """A request the engine refuses as given (the message says why); nothing else is affected."""


class Intake:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, slots: AdapterSlots, blocks: BlockManager,
                 prefix_caching: bool) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.slots = slots
        self.blocks = blocks
        self.prefix_caching = prefix_caching

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
        if self.prefix_caching:
            key = self.slots.cache_key(request.adapter) + "|" + self.slots.cache_key(request.soft_prompt)
            full = (seq.num_prompt_positions - 1) // self.blocks.block_size  # the last position is computed
            seq.prefix_hashes = prefix_hashes(seq.chunk_ids(0, seq.num_prompt_positions), self.blocks.block_size,
                                              full, key)
        return seq

    def encode(self, request: Request) -> Request:
        """The request with its prompt or chat turned into token ids. Safe to call from another
        thread (it only reads the tokenizer), so fronts tokenize off the engine's thread."""
        if request.prompt_token_ids is not None:
            return request
        return dataclasses.replace(request, prompt=None, messages=None, prompt_token_ids=self.prompt_ids(request))

    def prompt_ids(self, request: Request) -> list[int]:
        """The request's prompt as token ids: a text prompt through `tokenizer(text)`, a chat through
        the chat template with the generation prompt added, token ids as given (checked)."""
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_token_ids)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, messages or prompt_token_ids")
        if request.prompt is not None:
            if not isinstance(request.prompt, str):
                raise RequestError("prompt must be a string")
            ids = self.tokenizer(request.prompt)["input_ids"]
        elif request.messages is not None:
            ids = self._chat_ids(request.messages)
        else:
            ids = list(request.prompt_token_ids)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if not ids:
            raise RequestError("the prompt is empty")
        return list(ids)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if not self.tokenizer.chat_template:
            raise RequestError("this model has no chat template; send a prompt instead of messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

