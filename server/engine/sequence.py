"""Requests as the engine receives them, sequences as it runs them, outputs as it returns them."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from .sampler import SamplingParams, TokenLogprob

_ids = itertools.count()


@dataclass
class Request:
    """One generation request: a prompt (text, chat messages or token ids) and what to apply to it."""

    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    adapter: str | None = None
    soft_prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    # max_new_tokens came from a server default, not from the caller: shorten it to fit the context
    fit_max_new_tokens: bool = False
    # score, do not generate: the log-probability of each prompt token from this index on (the
    # continuation), teacher-forced (scoring.py); params.top_logprobs alternatives come with each
    score_from: int | None = None
    # or score this text after the prompt: tokenized on its own (no special tokens), appended to
    # the prompt's tokens, and scored from there (Intake.encode sets score_from)
    continuation: str | None = None


@dataclass
class RequestOutput:
    """What one step produced for one completion of a request: deltas since its previous output.

    A request with n > 1 has n completions (`index` 0..n-1). `finish_reason` is set on the output
    that ends completion `index`; `finished` on the request's last output, once every completion
    has ended (with n = 1 both come together)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "length" | "stop" | "eos" | "abort" | "error"
    error: str | None = None
    error_code: str | None = None  # a status name for fronts: RESOURCE_EXHAUSTED, INTERNAL
    prompt_tokens: int = 0
    completion_tokens: int = 0  # of this completion so far
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked for
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # a scoring request's continuation
    context_ids: list[int] = field(default_factory=list)  # a scoring request's tokens before it


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request inside the engine: its tokens, its KV blocks, its adapter slot."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        soft_prompt: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        detokenizer=None,
        index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.order = next(_ids)  # admission order, for preempting the newest first
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter
        self.soft_prompt = soft_prompt  # [num_virtual, hidden] or None
        self.soft_prompt_name: str | None = None  # the registered name of `soft_prompt`
        self.generator = generator
        self.detokenizer = detokenizer
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # per output id, when params.logprobs
        self.block_table: list[int] = []
        self.num_computed = 0  # positions whose keys and values are in the KV cache
        self.slot = -1  # adapter slot while running, -1 for none
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.sent_text = 0  # characters of final text already returned
        self.sent_ids = 0  # token ids already returned
        self.leader: Sequence | None = None  # for completions 1..n-1: completion 0, whose prompt KV they share
        self.score_from: int | None = None  # a scoring sequence: see Request.score_from
        self.scores: dict[int, TokenLogprob] = {}  # position -> log-probability of the next token
        self.prefix_hashes: list[bytes] = []  # of its full prompt blocks before the last position (prefix cache)

    @property
    def num_virtual(self) -> int:
        return 0 if self.soft_prompt is None else self.soft_prompt.shape[0]

    @property
    def num_prompt_positions(self) -> int:
        return self.num_virtual + len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Positions with (or about to get) KV entries: virtual, prompt and generated tokens."""
        return self.num_prompt_positions + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        """Whether positions before the last still lack KV entries (a decode computes only the last)."""
        return self.num_computed < self.num_tokens - 1

    def num_virtual_in(self, start: int, end: int) -> int:
        """How many of positions [start, end) are soft-prompt (virtual) positions."""
        return max(0, min(end, self.num_virtual) - start)

    def chunk_ids(self, start: int, end: int) -> list[int]:
        """Token ids fed at positions [start, end): 0 at virtual positions (their soft-prompt vectors
        replace the embedding), then the prompt and the generated tokens (recomputed after a
        preemption)."""
        nv = self.num_virtual
        virtual = self.num_virtual_in(start, end)
        lo, hi = max(start, nv) - nv, max(end, nv) - nv  # [lo, hi) of prompt_ids + output_ids
        n = len(self.prompt_ids)
        return [0] * virtual + self.prompt_ids[lo:hi] + self.output_ids[max(lo - n, 0):max(hi - n, 0)]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]


@dataclass
class Chunk:
    """Positions [start, start + length) of `seq` computed in one step. A chunk that reaches the
    sequence's last known position (when it is made) `samples`: it yields logits and a token; a
    shorter one only fills the KV cache. A scoring sequence never samples (scoring.py). A decode
    is a chunk of one position, the last."""

    seq: Sequence
    start: int
    length: int
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.end == self.seq.num_tokens and self.seq.score_from is None

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def is_decode(self) -> bool:
        return self.length == 1 and self.samples
