"""Teacher-forced scoring in the engine (scoring.py): each continuation token's log-probability,
computed in the same mixed prefill steps as generation, against PEFT's own forward pass.

PEFT's reference is log_softmax of its teacher-forced logits at the position before each
continuation token, for the base, a LoRA, a soft prompt and both (DESIGN.md's references).
"""
from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

ATOL = 1e-4  # float32, on log-probabilities
PROMPT = [5, 17, 42, 99, 7, 11, 3, 250, 64, 33, 8, 91, 20, 21, 140, 66, 5, 81]
SCORE_FROM = 7  # the continuation: PROMPT[7:]
CASES = [(None, None), ("attn4", None), ("all16", None), (None, "soft"), ("mlp8", "soft")]


def _engine(tiny_model, tiny_adapters, **kw) -> Engine:
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=2048, **kw))
    for name in ("attn4", "all16", "mlp8", "soft"):
        engine.register_adapter(name, str(tiny_adapters[name]))
    return engine


def scoring(adapter=None, soft=None, prompt=PROMPT, score_from=SCORE_FROM, top=0) -> Request:
    return Request(prompt_token_ids=list(prompt), adapter=adapter, soft_prompt=soft, score_from=score_from,
                   params=SamplingParams(logprobs=top > 0, top_logprobs=top))


def generating(prompt, adapter=None) -> Request:
    return Request(prompt_token_ids=list(prompt), adapter=adapter,
                   params=SamplingParams(max_new_tokens=6, ignore_eos=True))


def peft_logprobs(reference, tiny_model, tiny_adapters, adapter, soft, prompt=PROMPT, score_from=SCORE_FROM):
    """PEFT's log-probabilities [len(prompt) - score_from] of the continuation tokens."""
    model, vectors = reference.load(tiny_model, tiny_adapters.get(adapter), tiny_adapters.get(soft))
    logp = torch.log_softmax(reference.logits(model, prompt, vectors), dim=-1)
    return torch.tensor([logp[p - 1, prompt[p]].item() for p in range(score_from, len(prompt))])


@pytest.mark.parametrize("chunk", [None, 5])  # one prefill step, or chunks of 5 tokens over several steps
def test_scores_in_one_mixed_batch_equal_peft(tiny_model, tiny_adapters, reference, chunk):
    engine = _engine(tiny_model, tiny_adapters, prefill_chunk_tokens=chunk)
    others = [generating([200, 12, 7, 19], "attn4"), generating([9, 8, 7, 6, 5])]
    alone = [r.token_ids for r in engine.generate(others)]
    results = engine.generate([scoring(a, s) for a, s in CASES] + others)
    assert [r.token_ids for r in results[len(CASES):]] == alone  # scoring beside them changes nothing
    for (adapter, soft), result in zip(CASES, results):
        assert result.error is None and result.token_ids == [] and result.finish_reason == "length"
        assert [lp.token_id for lp in result.prompt_logprobs] == PROMPT[SCORE_FROM:]
        got = torch.tensor([lp.logprob for lp in result.prompt_logprobs])
        want = peft_logprobs(reference, tiny_model, tiny_adapters, adapter, soft)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{adapter}/{soft}: {m}")
    base = torch.tensor([lp.logprob for lp in results[0].prompt_logprobs])
    for result in results[1:len(CASES)]:  # each adapter's own distribution, not the base's
        assert (torch.tensor([lp.logprob for lp in result.prompt_logprobs]) - base).abs().max() > 0.01


def test_a_cached_prefix_still_scores_every_token(tiny_model, tiny_adapters, reference):
    """The prefix cache serves blocks only before the first scored position."""
    engine = _engine(tiny_model, tiny_adapters, prefix_caching=True)
    engine.generate([generating(PROMPT)])  # PROMPT's blocks enter the prefix cache
    [result] = engine.generate([scoring(score_from=10)])
    got = torch.tensor([lp.logprob for lp in result.prompt_logprobs])
    torch.testing.assert_close(got, peft_logprobs(reference, tiny_model, tiny_adapters, None, None, score_from=10),
                               atol=ATOL, rtol=0)


def test_top_alternatives_come_with_each_score(tiny_model, tiny_adapters):
    engine = _engine(tiny_model, tiny_adapters)
    [result] = engine.generate([scoring("attn4", top=3)])
    for lp in result.prompt_logprobs:
        assert len(lp.top) == 3 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.logprob <= lp.top[0][1] + 1e-6


@pytest.mark.parametrize("score_from, n, fragment", [
    (0, 1, "score_from must be an index in [1, 17]"),
    (len(PROMPT), 1, "score_from must be an index"),
    (True, 1, "score_from must be an index"),
    (3, 2, "n must be 1"),
])
def test_malformed_scoring_requests_are_refused(tiny_model, tiny_adapters, score_from, n, fragment):
    engine = _engine(tiny_model, tiny_adapters)
    request = Request(prompt_token_ids=list(PROMPT), score_from=score_from, params=SamplingParams(n=n))
    [result] = engine.generate([request])
    assert result.error is not None and fragment in result.error, result.error
