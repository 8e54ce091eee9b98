"""Log-probabilities and n completions per request, computed by the engine.

Logprobs are checked against the engine's own teacher-forced logits (`prompt_logits` over the
prompt plus the generated tokens): the value returned for a generated token must be the
log_softmax of the logits at the position that predicted it, before temperature or filtering.
n completions are checked against the same request sent n times with n = 1.
"""
from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine, RequestError
from loraplex.server.engine.sampler import Sampler, SamplingParams, make_generator, token_logprobs
from loraplex.server.engine.sequence import Request

ATOL = 1e-4
PROMPT = [5, 17, 42, 99, 7, 11, 3, 250, 64, 33]
OTHER = [200, 12, 7, 7, 19, 140, 66, 5, 81, 9]


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_adapters) -> Engine:
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=2048))
    engine.register_adapter("attn4", str(tiny_adapters["attn4"]))
    return engine


def request(prompt=PROMPT, adapter=None, rid=None, **params) -> Request:
    params.setdefault("ignore_eos", True)
    params.setdefault("max_new_tokens", 6)
    return Request(prompt_token_ids=list(prompt), adapter=adapter, params=SamplingParams(**params), request_id=rid)


def teacher_forced_logprobs(engine: Engine, prompt: list[int], generated: list[int], adapter=None) -> torch.Tensor:
    """log_softmax [len(generated), vocab] at the positions that predicted each generated token."""
    [logits] = engine.prompt_logits([Request(prompt_token_ids=prompt + generated, adapter=adapter)])
    return torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)


def assert_idle(engine: Engine) -> None:
    assert not engine.has_unfinished() and engine._seqs == {}
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"


# ----------------------------------------------------------------------------- sampler


def test_token_logprobs_are_log_softmax_of_the_rows_asked_for():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    tokens = Sampler()(logits, [SamplingParams(temperature=1.5, top_k=5)] * 4, [make_generator(i) for i in range(4)])
    out = token_logprobs(logits, tokens, rows=[1, 3], top_n=[0, 4])
    expected = torch.log_softmax(logits, dim=-1)
    assert [o.token_id for o in out] == [int(tokens[1]), int(tokens[3])]
    for o, row in zip(out, (1, 3)):
        assert o.logprob == pytest.approx(float(expected[row, o.token_id]), abs=1e-6)
    assert out[0].top == ()
    values, ids = expected[3].topk(4)
    assert [t for t, _ in out[1].top] == ids.tolist()
    assert [v for _, v in out[1].top] == pytest.approx(values.tolist(), abs=1e-6)
    assert token_logprobs(logits, tokens, rows=[], top_n=[]) == []


@pytest.mark.parametrize("fields, fragment", [
    (dict(n=0), "n must be in [1, 16]"),
    (dict(n=17), "n must be in [1, 16]"),
    (dict(n=True), "n must be an integer"),
    (dict(logprobs=1), "logprobs must be a bool"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs must be in [0, 20]"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs must be in [0, 20]"),
    (dict(top_logprobs=2), "top_logprobs needs logprobs"),
])
def test_bad_values_are_refused_by_name(engine, fields, fragment):
    with pytest.raises(RequestError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        engine.add_request(request(**fields))
    assert_idle(engine)


# ----------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("adapter", [None, "attn4"])
def test_greedy_logprobs_match_teacher_forced_logits(engine, adapter):
    [done] = engine.generate([request(adapter=adapter, logprobs=True, top_logprobs=5, max_new_tokens=8)])
    assert done.error is None and len(done.token_ids) == 8
    assert [lp.token_id for lp in done.logprobs] == done.token_ids
    expected = teacher_forced_logprobs(engine, PROMPT, done.token_ids, adapter)
    for step, lp in enumerate(done.logprobs):
        assert lp.logprob == pytest.approx(float(expected[step, lp.token_id]), abs=ATOL)
        values, ids = expected[step].topk(5)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=ATOL)
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
    assert_idle(engine)


def test_sampled_logprobs_are_the_models_distribution_before_temperature(engine):
    params = dict(temperature=3.0, top_k=4, seed=7, logprobs=True, top_logprobs=2, max_new_tokens=10)
    [done] = engine.generate([request(**params)])
    expected = teacher_forced_logprobs(engine, PROMPT, done.token_ids)
    got = torch.tensor([lp.logprob for lp in done.logprobs])
    raw = expected.gather(1, torch.tensor(done.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(got, raw, atol=ATOL, rtol=0)
    tempered = torch.log_softmax(expected / 3.0, dim=-1).gather(1, torch.tensor(done.token_ids)[:, None]).squeeze(1)
    assert (got - tempered).abs().max() > 0.1  # not the tempered distribution
    assert all(len(lp.top) == 2 for lp in done.logprobs)


def test_no_logprobs_unless_asked(engine):
    [done] = engine.generate([request()])
    assert done.logprobs == [] and len(done.token_ids) == 6


def test_logprobs_follow_the_ids_cut_by_a_stop_string(engine):
    [full] = engine.generate([request(max_new_tokens=12, logprobs=True)])
    stop = full.text[len(full.text) // 2:][:3]
    assert stop, full.text
    [cut] = engine.generate([request(max_new_tokens=12, logprobs=True, stop=(stop,))])
    assert cut.finish_reason == "stop" and len(cut.token_ids) < len(full.token_ids)
    assert [lp.token_id for lp in cut.logprobs] == cut.token_ids
    assert cut.logprobs == full.logprobs[:len(cut.token_ids)]


def test_streamed_logprobs_line_up_with_streamed_ids(engine):
    engine.add_request(request(rid="s", max_new_tokens=9, logprobs=True, top_logprobs=1))
    ids, lps = [], []
    while engine.has_unfinished():
        for out in engine.step():
            assert len(out.logprobs) == len(out.token_ids)
            ids += out.token_ids
            lps += out.logprobs
    assert len(ids) == 9 and [lp.token_id for lp in lps] == ids


# ----------------------------------------------------------------------------- n


def test_greedy_n_gives_n_equal_completions(engine):
    [alone] = engine.generate([request(adapter="attn4")])
    done = engine.generate([request(adapter="attn4", n=3)])
    assert [c.index for c in done] == [0, 1, 2]
    for c in done:
        assert c.error is None and c.finish_reason == "length"
        assert c.token_ids == alone.token_ids and c.text == alone.text
    assert_idle(engine)


def test_seeded_n_completion_i_is_the_request_with_seed_plus_i(engine):
    params = dict(temperature=1.5, top_p=0.95, seed=1234, max_new_tokens=10, logprobs=True)
    batch = engine.generate([request(n=4, **params), request(prompt=OTHER, n=2, **{**params, "seed": 9})])
    mine = batch[:4]
    singles = engine.generate([request(**{**params, "seed": 1234 + i}) for i in range(4)])
    for c, single in zip(mine, singles):
        assert c.token_ids == single.token_ids and c.text == single.text
        assert [lp.token_id for lp in c.logprobs] == c.token_ids
    assert len({tuple(c.token_ids) for c in mine}) > 1, "seeded completions should differ from each other"
    again = engine.generate([request(n=4, **params)])
    assert [c.token_ids for c in again] == [c.token_ids for c in mine]
    assert_idle(engine)


def test_n_outputs_finish_each_index_once_and_the_request_last(engine):
    rid = engine.add_request(request(rid="grp", n=3, temperature=1.0, seed=3, max_new_tokens=5, stop=("e",)))
    ends: dict[int, str] = {}
    finished = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid and 0 <= out.index < 3
            assert out.index not in ends, "output after its completion ended"
            if out.finish_reason is not None:
                ends[out.index] = out.finish_reason
            if out.finished:
                finished.append(out)
    assert sorted(ends) == [0, 1, 2] and all(r in ("length", "stop") for r in ends.values())
    assert len(finished) == 1 and finished[0].finish_reason is not None
    assert_idle(engine)


def test_abort_ends_every_completion(engine):
    rid = engine.add_request(request(prompt=[9, 8, 7, 6, 5, 4, 3, 2, 1, 10], rid="ab", n=4, max_new_tokens=50))
    engine.step()
    assert len(engine.scheduler.running) == 1  # the others wait for the prompt it computes
    engine.step()
    assert len(engine.scheduler.running) == 4
    assert engine.abort(rid)
    assert_idle(engine)
    assert not engine.abort(rid)


def test_abort_while_completions_wait_for_the_shared_prompt(engine):
    rid = engine.add_request(request(prompt=[19, 18, 17, 16, 15, 14, 13, 12, 11, 20], rid="ab2", n=3, max_new_tokens=50))
    engine.step()
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.waiting) == 2
    assert engine.abort(rid)
    assert_idle(engine)


LONG = [(7 * i + 3) % 300 + 3 for i in range(30)]  # 30 prompt positions: 7 full blocks of 4 before the last


def test_n_completions_compute_the_shared_prompt_once(engine, monkeypatch):
    """The first completion computes the prompt; the others take its full blocks before the last
    prompt position and compute at most a block more each, and still sample exactly what the
    same request with seed + i samples alone."""
    computed: list[int] = []
    real_run = engine.runner.run

    def run(chunks):
        computed.extend(c.length for c in chunks if c.start < len(LONG))
        return real_run(chunks)

    params = dict(temperature=1.2, seed=77, max_new_tokens=8)
    monkeypatch.setattr(engine.runner, "run", run)
    shared = engine.generate([request(prompt=LONG, n=4, **params)])
    prompt_positions = sum(computed)
    monkeypatch.undo()
    singles = engine.generate([request(prompt=LONG, **{**params, "seed": 77 + i}) for i in range(4)])
    assert [c.token_ids for c in shared] == [c.token_ids for c in singles]
    block = engine.blocks.block_size
    assert prompt_positions <= len(LONG) + 3 * block, prompt_positions  # 4 x 30 = 120 without sharing
    assert_idle(engine)


def test_completions_outlive_a_first_completion_that_ends_at_once(engine):
    """With one token each, the first completion ends (freeing its blocks) in the step that
    computes the prompt: the others then compute the whole prompt themselves."""
    params = dict(temperature=1.0, seed=5, max_new_tokens=1)
    shared = engine.generate([request(prompt=LONG, n=3, **params)])
    singles = engine.generate([request(prompt=LONG, **{**params, "seed": 5 + i}) for i in range(3)])
    assert [c.token_ids for c in shared] == [c.token_ids for c in singles]
    assert all(c.finish_reason == "length" for c in shared)
    assert_idle(engine)


def test_shared_prompt_blocks_survive_preemption(tiny_model):
    """A KV cache too small for every completion's full length: the newest are preempted and
    recomputed (sharing the prompt again when the leader still holds it), with the same tokens
    as without any pressure and nothing leaked."""
    params = dict(temperature=0.9, seed=11, max_new_tokens=40)
    roomy = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=2048))
    expected = [c.token_ids for c in roomy.generate([request(prompt=LONG, n=4, **params)])]
    tight = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=4 * 20))
    got = tight.generate([request(prompt=LONG, n=4, **params)])
    assert tight.scheduler.num_preemptions > 0
    assert [c.token_ids for c in got] == expected
    assert_idle(tight)


def test_n_with_an_adapter_that_cannot_load_fails_the_request_once(tiny_model, tiny_adapters, tmp_path):
    import shutil

    copy = tmp_path / "gone"
    shutil.copytree(tiny_adapters["mlp8"], copy)
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=512))
    engine.register_adapter("gone", str(copy))
    shutil.rmtree(copy)
    done = engine.generate([request(adapter="gone", n=3), request(n=2)])
    assert [c.error is not None for c in done] == [True, True, True, False, False]
    assert all(c.finish_reason == "length" for c in done[3:])
    assert_idle(engine)
