"""Offline use: the results of a whole workload, collected from the engine's streamed outputs.

`Engine.generate` runs a list of requests as one workload (the way `loraplex generate`, eval and
the benchmarks use the engine) and hands back one `Completion` per completion, in input order.
The engine streams deltas per request; `Workload` assembles them, so the engine's stepping code
knows nothing of how offline callers want their results.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sampler import TokenLogprob
from .sequence import Request, RequestOutput, Sequence


@dataclass
class Completion:
    """The whole result of one completion of a request (offline use)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    index: int = 0  # which of the request's n completions
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # a scoring request's continuation


class Workload:
    """Results in input order, a request with n > 1 giving its n completions in a row."""

    def __init__(self) -> None:
        self.results: list[Completion] = []
        self._by_id: dict[str, list[Completion]] = {}

    def refused(self, request: Request, error: Exception) -> None:
        """`request` was refused as given: its one result carries the error."""
        self.results.append(Completion(request.request_id or "", error=str(error), finish_reason="error"))

    def queued(self, request_id: str, group: list[Sequence]) -> None:
        """The request `request_id` was queued as the sequences `group` (one per completion)."""
        completions = [Completion(request_id, prompt_tokens=len(s.prompt_ids), index=s.index) for s in group]
        self.results += completions
        self._by_id[request_id] = completions

    def add(self, out: RequestOutput) -> None:
        """One output of a step; a failure's error reaches every completion of its request."""
        completions = self._by_id.get(out.request_id)
        if completions is None:
            return
        completion = completions[out.index]
        completion.text += out.text
        completion.token_ids += out.token_ids
        completion.logprobs += out.logprobs
        completion.prompt_logprobs += out.prompt_logprobs
        if out.error is not None:  # the whole request failed
            for c in completions:
                c.finish_reason, c.error = out.finish_reason, out.error
        elif out.finish_reason is not None:
            completion.finish_reason = out.finish_reason
