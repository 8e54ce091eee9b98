"""One adapter must never hurt another tenant (DESIGN.md, Isolation).

An adapter whose lora_B is NaN, inf or 1e30 (or a soft prompt whose vectors are) is refused at
registration. The engine must hold anyway, so most tests here inject one past validation (the
value check is switched off while it registers and loads) and check:

- the mixed batch holding the poisoned row gives every other row the very logits the same batch
  gives with a finite adapter of the same shape in that row (same batch shape, so the same
  summation order: compared exactly), and every batch after it equals the clean run's;
- the poisoned request fails alone (INTERNAL, saying why), its KV blocks never enter the prefix
  cache, and its adapter is quarantined (FAILED_PRECONDITION) until registered again;
- it is never merged, statically or dynamically.

The clean run is the same engine, the same requests and the same steps, with the finite twin in
the poisoned row; it aborts that row after the first step, where the poisoned run fails it, so
both keep the same batch shapes from then on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.engine import adapter_slots
from loraplex.server.engine.adapter_errors import AdapterError, AdapterQuarantined
from loraplex.server.engine.block_manager import prefix_hashes
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request, RequestOutput

# Six distinct 10-token prompts (ids below the tiny tokenizer's 320): what they say does not
# matter here, only that rows differ.
PROMPTS = [[(37 * row + 11 * col + 5) % 300 for col in range(10)] for row in range(6)]
VALUES = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}
BLOCK = 4
NEW_TOKENS = 6


# ----------------------------------------------------------------------------- poisoned adapters


def poison_lora(src: Path, out: Path, value: float) -> Path:
    """A copy of the LoRA `src` whose every lora_B entry is `value` (same shapes, same config)."""
    shutil.copytree(src, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(t, value) if ".lora_B." in k else t for k, t in tensors.items()}, str(weights),
              metadata={"format": "pt"})
    return out


def poison_soft(src: Path, out: Path, value: float) -> Path:
    """A copy of the soft prompt `src` whose every vector entry is `value`."""
    shutil.copytree(src, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(t, value) for k, t in tensors.items()}, str(weights), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def poisoned(tiny_adapters, tmp_path_factory) -> dict[str, Path]:
    """lora-{nan,inf,huge} (attn4's shape), soft-{nan,huge} (soft's shape), lora-alpha (attn4 with
    lora_alpha 1e308)."""
    root = tmp_path_factory.mktemp("poisoned")
    out = {f"lora-{k}": poison_lora(tiny_adapters["attn4"], root / f"lora-{k}", v) for k, v in VALUES.items()}
    out |= {f"soft-{k}": poison_soft(tiny_adapters["soft"], root / f"soft-{k}", VALUES[k]) for k in ("nan", "huge")}
    alpha = root / "lora-alpha"
    shutil.copytree(tiny_adapters["attn4"], alpha)
    config = json.loads((alpha / "adapter_config.json").read_text())
    (alpha / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308}))
    out["lora-alpha"] = alpha
    return out


@pytest.fixture
def unchecked(monkeypatch):
    """Registration and slot loads skip the value check: how a poisoned adapter gets past validation."""
    monkeypatch.setattr(adapter_slots, "check_values", lambda *args, **kwargs: None)


# ----------------------------------------------------------------------------- running and recording


def make_engine(tiny_model, tiny_adapters, row_adapter: tuple[str, Path], **kw) -> Engine:
    """The tenants every test shares, plus `row_adapter` (name, path): the poisoned one or its twin."""
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=BLOCK, max_total_tokens=96, **kw))
    tenants = {"good": "mlp8", "neighbour": "attn4", "other": "all16", "soft": "soft"}
    for name, fixture in tenants.items():
        engine.register_adapter(name, str(tiny_adapters[fixture]))
    name, path = row_adapter
    engine.register_adapter(name, str(path))
    return engine


def request(rid: str, prompt: int, adapter: str | None = None, soft: str | None = None, length: int = 10,
            new: int = NEW_TOKENS) -> Request:
    return Request(prompt_token_ids=PROMPTS[prompt % len(PROMPTS)][:length], adapter=adapter, soft_prompt=soft,
                   request_id=rid, params=SamplingParams(max_new_tokens=new, ignore_eos=True))


def tenants(phase: str, shift: int, **kw) -> list[Request]:
    """The other tenants' requests: base, three LoRAs (one of the poisoned row's rank class), a soft prompt."""
    return [request(f"{phase}-base", shift, **kw), request(f"{phase}-good", shift + 1, "good", **kw),
            request(f"{phase}-neighbour", shift + 3, "neighbour", **kw),
            request(f"{phase}-soft", shift + 4, soft="soft", **kw),
            request(f"{phase}-other", shift + 5, "other", soft="soft", **kw)]


def after(phase: str = "after") -> list[Request]:
    """The batch after the mixed one: one-token prompts, so every KV block is filled one decode at a
    time and read while part of it is stale, and 15 new tokens, so together they take all 24 blocks
    (3 x 4 + 2 x 6 with the soft prompt's 5 positions): the poisoned request's blocks among them."""
    return tenants(phase, 3, length=1, new=15)


def row_request(kind: str) -> Request:
    return request("row", 2, adapter="x") if kind == "lora" else request("row", 2, soft="x")


class Run:
    """Steps an engine by hand, recording every step's logits per request and every output."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.logits: list[dict[str, torch.Tensor]] = []
        self.outputs: dict[str, list[RequestOutput]] = defaultdict(list)
        run = engine.runner.run

        def recording(chunks):
            logits, seqs = run(chunks)
            self.logits.append({s.request_id: row.clone() for s, row in zip(seqs, logits)})
            return logits, seqs

        engine.runner.run = recording

    def phase(self, requests: list[Request], abort_after_first: tuple[str, ...] = ()) -> None:
        for r in requests:
            self.engine.add_request(r)
        self.engine.slots.read_ahead([r.adapter for r in requests if r.adapter])  # one batch from the start
        steps = 0
        while self.engine.has_unfinished():
            for out in self.engine.step():
                self.outputs[out.request_id].append(out)
            steps += 1
            if steps == 1:
                for rid in abort_after_first:
                    self.engine.abort(rid)

    def tokens(self, rid: str) -> list[int]:
        return [t for out in self.outputs[rid] for t in out.token_ids]


def assert_same_logits(poisoned: Run, clean: Run, skip: str = "row") -> None:
    """Step by step, every row but `skip` bit-identical."""
    assert len(poisoned.logits) == len(clean.logits)
    for step, (got, want) in enumerate(zip(poisoned.logits, clean.logits)):
        assert got.keys() - {skip} == want.keys() - {skip}, step
        for rid in want.keys() - {skip}:
            assert torch.isfinite(got[rid]).all(), (step, rid)
            assert torch.equal(got[rid], want[rid]), (step, rid, (got[rid] - want[rid]).abs().max())


def assert_failed_alone(run: Run, what: str) -> None:
    [out] = run.outputs["row"]
    assert out.finished and out.finish_reason == "error" and out.error_code == "INTERNAL", out
    assert "non-finite" in out.error and repr(what) in out.error, out.error
    assert not out.token_ids


# ----------------------------------------------------------------------------- the isolation test


def row_prefix_cached(engine: Engine, kind: str) -> int:
    """How many of the poisoned row's full prompt blocks the prefix cache holds."""
    row = row_request(kind)
    key = engine.slots.cache_key(row.adapter) + "|" + engine.slots.cache_key(row.soft_prompt)
    positions = [0] * (5 if kind == "soft" else 0) + row.prompt_token_ids  # soft: 5 virtual positions first
    return engine.blocks.cached_count(prefix_hashes(positions, BLOCK, (len(positions) - 1) // BLOCK, key))[0]


@pytest.mark.parametrize("poison", ["lora-nan", "lora-inf", "lora-huge", "soft-nan", "soft-huge"])
def test_poisoned_row_changes_no_other_row(poison, tiny_model, tiny_adapters, poisoned, unchecked):
    kind = poison.split("-")[0]
    twin = tiny_adapters["attn4" if kind == "lora" else "soft"]
    clean = Run(make_engine(tiny_model, tiny_adapters, ("x", twin)))
    clean.phase(tenants("mixed", 0) + [row_request(kind)], abort_after_first=("row",))
    assert row_prefix_cached(clean.engine, kind) == 2  # a finite row's prompt blocks are cached ...
    clean.phase(after())
    bad = Run(make_engine(tiny_model, tiny_adapters, ("x", poisoned[poison])))
    bad.phase(tenants("mixed", 0) + [row_request(kind)])
    assert row_prefix_cached(bad.engine, kind) == 0  # ... the poisoned row's never
    with pytest.raises(AdapterQuarantined, match="non-finite") as refused:
        bad.engine.add_request(row_request(kind))
    assert refused.value.status == "FAILED_PRECONDITION"
    bad.phase(after())

    assert_same_logits(bad, clean)
    assert_failed_alone(bad, "x")
    for r in tenants("mixed", 0) + after():
        tokens = bad.tokens(r.request_id)
        assert tokens == clean.tokens(r.request_id) and len(tokens) == r.params.max_new_tokens, r.request_id


@pytest.mark.parametrize("poison", ["lora-nan", "soft-huge"])
def test_a_poisoned_scoring_row_changes_no_other_row(poison, tiny_model, tiny_adapters, poisoned, unchecked):
    """A scoring request (scoring.py) shares the prefill steps too, and fails alone the same way."""
    kind = poison.split("-")[0]
    twin = tiny_adapters["attn4" if kind == "lora" else "soft"]
    scoring = [dataclasses.replace(row_request(kind), score_from=3)]
    clean = Run(make_engine(tiny_model, tiny_adapters, ("x", twin)))
    clean.phase(tenants("mixed", 0) + scoring)
    clean.phase(after())
    [scored] = clean.outputs["row"]
    assert len(scored.prompt_logprobs) == 7 and all(math.isfinite(lp.logprob) for lp in scored.prompt_logprobs)
    bad = Run(make_engine(tiny_model, tiny_adapters, ("x", poisoned[poison])))
    bad.phase(tenants("mixed", 0) + scoring)
    bad.phase(after())

    assert_same_logits(bad, clean)
    assert_failed_alone(bad, "x")
    assert not bad.outputs["row"][0].prompt_logprobs
    for r in tenants("mixed", 0) + after():
        assert bad.tokens(r.request_id) == clean.tokens(r.request_id), r.request_id


def test_poisoned_row_on_the_triton_path(tiny_model, tiny_adapters, poisoned, unchecked):
    """The guarantees sit in the attention and the model's last step, not in the LoRA ops: the
    Triton kernels (here in Triton's interpreter) give the same isolation."""
    clean = Run(make_engine(tiny_model, tiny_adapters, ("x", tiny_adapters["attn4"]), kernels="triton"))
    clean.phase(tenants("mixed", 0) + [row_request("lora")], abort_after_first=("row",))
    clean.phase(after())
    bad = Run(make_engine(tiny_model, tiny_adapters, ("x", poisoned["lora-nan"]), kernels="triton"))
    bad.phase(tenants("mixed", 0) + [row_request("lora")])
    bad.phase(after())
    assert_same_logits(bad, clean)
    assert_failed_alone(bad, "x")


def test_poisoned_row_beside_a_merged_adapter(tiny_model, tiny_adapters, poisoned, unchecked):
    """With another adapter served from merged weights, the rest of the batch runs on the merged
    copy (correct) or beside it (split): the poisoned row still changes nothing else."""
    runs = []
    for path, abort in ((tiny_adapters["attn4"], ("row",)), (poisoned["lora-inf"], ())):
        run = Run(make_engine(tiny_model, tiny_adapters, ("x", path)))
        run.engine.merge_adapter("good", static=True)
        run.phase(tenants("mixed", 0) + [request(f"more-{i}", i, "good") for i in range(6)]
                  + [row_request("lora")], abort_after_first=abort)
        run.phase(after())
        runs.append(run)
    clean, bad = runs
    assert_same_logits(bad, clean)
    assert_failed_alone(bad, "x")
    assert bad.engine.merger.merged == "good"


# ----------------------------------------------------------------------------- quarantine and merging


def test_quarantine_lasts_until_registered_again(tiny_model, tiny_adapters, poisoned, unchecked):
    engine = make_engine(tiny_model, tiny_adapters, ("x", poisoned["lora-nan"]), max_running=1)
    run = Run(engine)
    # requests queued on the adapter when it is caught (one runs at a time) fail with it, as
    # FAILED_PRECONDITION, without running
    run.phase([row_request("lora")] + [request(f"queued-{i}", i, "x") for i in range(2)])
    assert_failed_alone(run, "x")
    for i in range(2):
        [out] = run.outputs[f"queued-{i}"]
        assert out.error_code == "FAILED_PRECONDITION" and "quarantined" in out.error, out
    assert len(run.logits) == 1  # the poisoned row's step: the queued ones never ran
    with pytest.raises(AdapterQuarantined):
        engine.slots.pin("x")
    engine.register_adapter("x", str(tiny_adapters["attn4"]))  # fixed: registered again
    [done] = engine.generate([request("again", 2, "x")])
    assert done.error is None and len(done.token_ids) == NEW_TOKENS


def test_a_poisoned_adapter_is_never_merged(tiny_model, tiny_adapters, poisoned, unchecked):
    engine = make_engine(tiny_model, tiny_adapters, ("x", poisoned["lora-huge"]))
    with pytest.raises(AdapterError, match="x"):
        engine.merge_adapter("x", static=True)
    assert engine.merger.merged is None and engine.merger.policy.static is None
    with pytest.raises(AdapterQuarantined):
        engine.add_request(row_request("lora"))


def test_dynamic_merging_skips_a_poisoned_adapter(tiny_model, tiny_adapters, poisoned, unchecked):
    """Most of the batch on the poisoned adapter would have it merged after one step (patience 1),
    and the base row would then run on its merged copy; it is quarantined instead."""
    clean = make_engine(tiny_model, tiny_adapters, ("x", tiny_adapters["attn4"]))
    [expected] = clean.generate([request("base", 0)])
    engine = make_engine(tiny_model, tiny_adapters, ("x", poisoned["lora-nan"]), dynamic_merge=True,
                         merge_patience=1)
    merges = []
    follow = engine._follow_merge_policy

    def watching(running):
        follow(running)
        merges.append(engine.merger.merged)

    engine._follow_merge_policy = watching
    results = engine.generate([request("base", 0)] + [request(f"x{i}", i + 1, "x") for i in range(5)])
    assert results[0].error is None and results[0].token_ids == expected.token_ids
    assert all(r.error is not None for r in results[1:])
    assert merges and set(merges) == {None} and engine.merger.switches == 0


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("poison", ["lora-nan", "lora-inf", "lora-huge", "lora-alpha", "soft-nan", "soft-huge"])
def test_registration_refuses_poisoned_values(poison, tiny_model, tiny_adapters, poisoned):
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=BLOCK, max_total_tokens=128))
    with pytest.raises(AdapterError) as refused:
        engine.register_adapter("x", str(poisoned[poison]))
    message = str(refused.value)
    assert str(poisoned[poison]) in message
    assert ("NaN or infinite" in message) if poison in ("lora-nan", "lora-inf", "lora-alpha", "soft-nan") \
        else ("norm" in message)
    assert "x" not in engine.slots.registered


def test_registration_accepts_the_test_adapters(tiny_model, tiny_adapters, builders, tmp_path):
    """The bound is far from the adapters the tests build: every fixture adapter, and a rank-16
    LoRA with entries of 1 on every projection (about 14x the base weight: well inside)."""
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=BLOCK, max_total_tokens=128))
    for name, path in tiny_adapters.items():
        engine.register_adapter(name, str(path))
    wide = builders.lora(tiny_model, tmp_path / "wide", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], r=16, alpha=16, seed=7, scale=1.0)
    engine.register_adapter("wide", str(wide))
