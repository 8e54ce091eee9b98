"""AdapterSlots on a real engine over the tiny model: on-demand loading, reference counts, LRU
eviction, pinning, the host cache, the rank pools, unregistering, and slot pressure end to end."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.server.engine import adapter_slots as adapter_slots_module
from loraplex.server.engine.adapter_errors import AdapterError
from loraplex.server.engine.adapters import load_adapter
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

LORAS = ["attn4", "mlp8", "all16", "rs2"]


def _engine(tiny_model, adapters, **overrides) -> Engine:
    kw = dict(model=str(tiny_model), max_loras=2, max_cpu_loras=2, max_total_tokens=1024, block_size=4)
    kw.update(overrides)
    engine = Engine(EngineConfig(**kw))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return engine


@pytest.fixture
def engine(tiny_model, tiny_adapters) -> Engine:
    return _engine(tiny_model, tiny_adapters)


@pytest.fixture
def disk_loads(monkeypatch) -> list[str]:
    """Names of the adapters AdapterSlots reads from disk, in order."""
    seen: list[str] = []
    real = adapter_slots_module.load_adapter

    def counting(path, name, *args, **kwargs):
        seen.append(name)
        return real(path, name, *args, **kwargs)

    monkeypatch.setattr(adapter_slots_module, "load_adapter", counting)
    return seen


def _entry_weights(engine: Engine, slot: int, proj: str, layer: int):
    """(A, B) stored for `slot` in the pool of `proj` in layer `layer`, at the pool's rank."""
    rank, entry = engine.slots.tables[proj].entries[slot]
    a_pool, b_pool = engine.slots.layers[proj][layer].pools[proj][rank]
    return a_pool[entry], b_pool[entry]


def _assert_slot_holds(engine: Engine, slot: int, path: Path):
    """Every projection of every layer of `slot` holds exactly what load_adapter returns
    (zero-padded up to the pool's rank; zero where the adapter leaves a layer alone), and
    projections the adapter does not target have no entry for the slot."""
    slots = engine.slots
    adapter = load_adapter(path, "check", slots.base, slots.max_rank, slots.dtype)
    for proj, table in slots.tables.items():
        if proj not in adapter.ranks:
            assert slot not in table.entries, proj
            continue
        rank, _ = table.entries[slot]
        assert rank == adapter.ranks[proj], proj
        for layer in range(slots.base.num_layers):
            a_got, b_got = _entry_weights(engine, slot, proj, layer)
            expected = adapter.weights.get((layer, proj))
            if expected is None:
                assert not a_got.any() and not b_got.any(), (proj, layer)
                continue
            a, b = expected
            r = a.shape[0]
            assert torch.equal(a_got[:r], a) and torch.equal(b_got[:, :r], b), (proj, layer)
            assert not a_got[r:].any() and not b_got[:, r:].any(), (proj, layer)


# acquire / release ------------------------------------------------------------------------


def test_acquire_loads_on_demand_and_reuses_the_slot(engine):
    slots = engine.slots
    assert slots.loads == 0 and slots.resident() == []
    s = slots.acquire("attn4")
    assert s is not None and slots.loads == 1 and slots.resident() == ["attn4"]
    assert slots.acquire("attn4") == s and slots.loads == 1
    t = slots.acquire("mlp8")
    assert t not in (None, s) and slots.loads == 2
    assert sorted(slots.resident()) == ["attn4", "mlp8"]
    assert slots.evictions == 0


def test_unknown_or_soft_prompt_names_cannot_be_acquired(engine):
    with pytest.raises(AdapterError):
        engine.slots.acquire("nope")
    with pytest.raises(AdapterError):
        engine.slots.acquire("soft")  # a soft prompt never takes a LoRA slot
    assert engine.slots.loads == 0


def test_referenced_slots_are_never_evicted(engine):
    slots = engine.slots
    a, b = slots.acquire("attn4"), slots.acquire("mlp8")
    assert slots.acquire("all16") is None
    assert slots.loads == 2 and slots.evictions == 0
    assert sorted(slots.resident()) == ["attn4", "mlp8"]
    # attn4 referenced twice: one release leaves it referenced
    assert slots.acquire("attn4") == a
    slots.release(a)
    assert slots.acquire("all16") is None
    slots.release(a)  # now unreferenced: evictable
    c = slots.acquire("all16")
    assert c == a and slots.evictions == 1 and slots.loads == 3
    assert sorted(slots.resident()) == ["all16", "mlp8"]
    assert slots.acquire("mlp8") == b and slots.loads == 3  # untouched while referenced


@pytest.mark.parametrize("first_released", ["attn4", "mlp8"])
def test_least_recently_released_slot_is_evicted(engine, first_released):
    slots = engine.slots
    held = {name: slots.acquire(name) for name in ("attn4", "mlp8")}
    other = "mlp8" if first_released == "attn4" else "attn4"
    slots.release(held[first_released])
    slots.release(held[other])
    assert slots.acquire("all16") == held[first_released]
    assert sorted(slots.resident()) == sorted(["all16", other])
    assert slots.evictions == 1


def test_reacquiring_refreshes_recency(engine):
    slots = engine.slots
    a, b = slots.acquire("attn4"), slots.acquire("mlp8")
    slots.release(a)
    slots.release(b)  # LRU order: attn4, mlp8
    assert slots.acquire("attn4") == a and slots.loads == 2  # resident: no load
    slots.release(a)  # LRU order now: mlp8, attn4
    assert slots.acquire("all16") == b
    assert sorted(slots.resident()) == ["all16", "attn4"]


# pinning ---------------------------------------------------------------------------------


def test_pin_keeps_an_adapter_resident_under_pressure(engine):
    slots = engine.slots
    p = slots.pin("attn4")  # oldest of all, yet never evicted
    assert slots.resident() == ["attn4"] and slots.loads == 1
    for name in ("mlp8", "all16", "rs2"):
        s = slots.acquire(name)
        assert s is not None and s != p
        slots.release(s)
        assert "attn4" in slots.resident()
    assert slots.loads == 4 and slots.evictions == 2
    # the only other slot referenced: nothing can be evicted, the pinned one included
    held = slots.acquire("rs2")
    assert slots.acquire("mlp8") is None
    assert slots.acquire("attn4") == p  # a pinned adapter is still acquired as usual
    slots.release(p)
    assert slots.acquire("mlp8") is None  # released, but still pinned
    slots.unpin("attn4")
    assert slots.acquire("mlp8") == p
    assert sorted(slots.resident()) == ["mlp8", "rs2"]
    slots.release(held)


def test_pin_when_every_slot_is_referenced_raises(engine):
    slots = engine.slots
    slots.acquire("attn4")
    slots.acquire("mlp8")
    with pytest.raises(AdapterError, match="all16"):
        slots.pin("all16")
    assert "all16" not in slots.pinned and "all16" not in slots.resident()


def test_pin_when_other_slots_are_pinned_or_referenced_raises(engine):
    slots = engine.slots
    slots.pin("attn4")
    held = slots.acquire("mlp8")
    with pytest.raises(AdapterError):
        slots.pin("all16")
    slots.release(held)
    assert slots.pin("all16") == held  # mlp8 is evictable now
    assert sorted(slots.pinned) == ["all16", "attn4"]
    with pytest.raises(AdapterError):
        slots.pin("rs2")  # both slots pinned


def test_pinning_a_referenced_adapter_survives_its_release(engine):
    slots = engine.slots
    s = slots.acquire("attn4")
    assert slots.pin("attn4") == s
    slots.release(s)
    t = slots.acquire("mlp8")
    slots.release(t)
    slots.acquire("all16")  # evicts mlp8, not the pinned attn4
    assert sorted(slots.resident()) == ["all16", "attn4"]


# host cache -------------------------------------------------------------------------------


def _cycle(slots, name):
    s = slots.acquire(name)
    assert s is not None
    slots.release(s)
    return s


def test_host_cache_drops_the_least_recently_used(tiny_model, tiny_adapters, disk_loads):
    engine = _engine(tiny_model, {n: tiny_adapters[n] for n in LORAS}, max_loras=1, max_cpu_loras=2)
    slots = engine.slots
    disk_loads.clear()  # registering read each adapter once, to check its values; it kept no copy
    _cycle(slots, "attn4")
    _cycle(slots, "mlp8")  # evicts attn4 from the device; the host still holds it
    assert list(slots._host) == ["attn4", "mlp8"]
    _cycle(slots, "attn4")  # a host hit: no disk read, and attn4 becomes most recent
    assert disk_loads == ["attn4", "mlp8"] and slots.loads == 3
    assert list(slots._host) == ["mlp8", "attn4"]
    _cycle(slots, "all16")  # over max_cpu_loras: mlp8 (LRU), not attn4 (oldest inserted), goes
    assert list(slots._host) == ["attn4", "all16"]
    _cycle(slots, "mlp8")
    assert disk_loads == ["attn4", "mlp8", "all16", "mlp8"]
    assert list(slots._host) == ["all16", "mlp8"]


def test_adapter_dropped_from_host_reloads_identical_weights(engine, tiny_adapters, disk_loads):
    slots = engine.slots
    first = _cycle(slots, "attn4")
    before = {(proj, layer): tuple(t.clone() for t in _entry_weights(engine, first, proj, layer))
              for proj in ("q_proj", "o_proj") for layer in range(2)}
    _assert_slot_holds(engine, first, tiny_adapters["attn4"])
    for name in ("mlp8", "all16", "rs2"):
        _cycle(slots, name)
    assert "attn4" not in slots._host and "attn4" not in slots.resident()
    assert len(slots._host) == 2
    again = slots.acquire("attn4")
    assert disk_loads.count("attn4") == 2
    _assert_slot_holds(engine, again, tiny_adapters["attn4"])
    for (proj, layer), (a, b) in before.items():
        a2, b2 = _entry_weights(engine, again, proj, layer)
        assert torch.equal(a, a2) and torch.equal(b, b2)


# rank pools -------------------------------------------------------------------------------


def test_pools_hold_each_rank_unpadded_with_exact_weights(engine, tiny_adapters):
    slots = engine.slots
    s4, s16 = slots.acquire("attn4"), slots.acquire("all16")
    hidden = slots.base.hidden_size
    for layer in slots.layers["q_proj"]:
        pools = layer.pools["q_proj"]
        assert set(pools) == {4, 16}
        out_q = slots.base.projection_shapes["q_proj"][0]
        a4, b4 = pools[4]
        assert a4.shape[1:] == (4, hidden) and b4.shape[1:] == (out_q, 4)
        assert pools[16][0].shape[1:] == (16, hidden)
    # attn4 leaves the MLP alone: only all16 lives in the gate pools
    for layer in slots.layers["gate_proj"]:
        assert set(layer.pools["gate_proj"]) == {16}
    _assert_slot_holds(engine, s4, tiny_adapters["attn4"])
    _assert_slot_holds(engine, s16, tiny_adapters["all16"])
    # rsLoRA scale folded into B: alpha / sqrt(r), not alpha / r
    slots.release(s4)
    s2 = slots.acquire("rs2")
    _assert_slot_holds(engine, s2, tiny_adapters["rs2"])
    adapter = load_adapter(tiny_adapters["rs2"], "rs2", slots.base, slots.max_rank)
    assert adapter.scales[(0, "q_proj")] == pytest.approx(4 / 2**0.5)


@pytest.fixture(scope="module")
def partial_adapters(tiny_model, builders, tmp_path_factory) -> dict[str, Path]:
    """One LoRA on layer 1 only, one whose q_proj rank differs by layer (rank_pattern)."""
    root = tmp_path_factory.mktemp("partial")
    return {
        "layer1": builders.lora(tiny_model, root / "layer1", ["q_proj", "gate_proj"], r=8, alpha=8, seed=21,
                             layers_to_transform=[1]),
        "pattern": builders.lora(tiny_model, root / "pattern", ["q_proj"], r=4, alpha=8, seed=22,
                              rank_pattern={"model.layers.0.self_attn.q_proj": 8}),
    }


def test_untouched_layers_are_zero_and_smaller_layers_zero_padded(engine, tiny_adapters, partial_adapters):
    slots = engine.slots
    for name, path in partial_adapters.items():
        engine.register_adapter(name, str(path))
    # mlp8 first fills the gate_proj rank-8 entry in both layers, so stale weights would show
    s = _cycle(slots, "mlp8")
    t = _cycle(slots, "all16")
    assert {s, t} == {0, 1}
    got = slots.acquire("layer1")  # evicts mlp8 (LRU), reusing its gate_proj rank-8 entry
    assert got == s
    _assert_slot_holds(engine, got, partial_adapters["layer1"])
    a0, b0 = _entry_weights(engine, got, "gate_proj", 0)
    assert not a0.any() and not b0.any()  # layer 0 is left alone: zero, not mlp8's old weights
    slots.release(got)
    got = slots.acquire("pattern")
    assert slots.tables["q_proj"].entries[got][0] == 8  # the largest rank over layers
    _assert_slot_holds(engine, got, partial_adapters["pattern"])
    a1, _ = _entry_weights(engine, got, "q_proj", 1)
    assert a1[:4].any() and not a1[4:].any()


# unregister / re-register -----------------------------------------------------------------


def test_unregister_while_referenced_frees_the_slot_on_release(engine):
    slots = engine.slots
    s = slots.acquire("attn4")
    engine.unregister_adapter("attn4")
    assert "attn4" not in slots.resident() and slots.kind("attn4") is None
    with pytest.raises(AdapterError):
        slots.acquire("attn4")
    t = slots.acquire("mlp8")
    assert t != s
    assert slots.acquire("all16") is None  # the retired slot is still in use
    assert s in slots.tables["q_proj"].entries  # its weights stay for the running sequences
    slots.release(s)
    assert s not in slots.tables["q_proj"].entries
    assert slots.acquire("all16") == s
    assert sorted(slots.resident()) == ["all16", "mlp8"]


def test_unregister_unreferenced_frees_at_once(engine):
    slots = engine.slots
    s = _cycle(slots, "attn4")
    engine.unregister_adapter("attn4")
    assert slots.resident() == [] and "attn4" not in slots._host
    assert all(s not in t.entries for t in slots.tables.values())
    with pytest.raises(KeyError):
        engine.unregister_adapter("attn4")


def test_reregistering_a_name_serves_the_new_weights(engine, tiny_adapters):
    slots = engine.slots
    engine.register_adapter("x", str(tiny_adapters["attn4"]))
    old = slots.acquire("x")
    _assert_slot_holds(engine, old, tiny_adapters["attn4"])
    engine.register_adapter("x", str(tiny_adapters["all16"]))  # while the old one is referenced
    new = slots.acquire("x")
    assert new != old
    _assert_slot_holds(engine, new, tiny_adapters["all16"])
    _assert_slot_holds(engine, old, tiny_adapters["attn4"])  # running sequences keep theirs
    assert slots.resident() == ["x"]
    slots.release(old)
    assert all(old not in t.entries for t in slots.tables.values())
    slots.release(new)
    # re-register while unreferenced (and in the host cache): no stale copy is served
    engine.register_adapter("x", str(tiny_adapters["mlp8"]))
    assert slots.resident() == []
    again = slots.acquire("x")
    _assert_slot_holds(engine, again, tiny_adapters["mlp8"])


# end to end -------------------------------------------------------------------------------

PROMPTS = {"attn4": [5, 17, 42, 99, 7], "mlp8": [11, 3, 250, 64, 33, 8], "all16": [200, 12, 9],
           "rs2": [7, 7, 19, 140, 66, 81, 9]}


def _request(name: str) -> Request:
    return Request(prompt_token_ids=PROMPTS[name], adapter=name, request_id=f"req-{name}",
                   params=SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))


def test_slot_pressure_does_not_change_results(tiny_model, tiny_adapters):
    loras = {n: tiny_adapters[n] for n in LORAS}
    tight = _engine(tiny_model, loras, max_loras=2, max_cpu_loras=2)
    results = tight.generate([_request(n) for n in LORAS])
    assert [r.error for r in results] == [None] * 4
    assert all(r.finish_reason == "length" and len(r.token_ids) == 4 for r in results)
    assert tight.slots.loads == 4 and tight.slots.evictions >= 2  # there was pressure
    assert not tight.has_unfinished() and all(ref == 0 for ref in tight.slots._refs)
    differs_from_base = 0
    for name, result in zip(LORAS, results):
        alone = _engine(tiny_model, loras, max_loras=8, max_cpu_loras=8)
        [expected] = alone.generate([_request(name)])
        assert expected.error is None
        assert result.token_ids == expected.token_ids, name
        base = _request(name)
        base.adapter = None
        [plain] = alone.generate([base])
        differs_from_base += plain.token_ids != expected.token_ids
    # the adapters matter, so serving one from the wrong slot would show
    assert differs_from_base >= 3


def test_two_adapters_of_rank_two_prefilled_together(tiny_model, tiny_adapters):
    engine = _engine(tiny_model, {"a": tiny_adapters["rs2"], "b": tiny_adapters["rs2"]}, max_loras=2)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    results = engine.generate([Request(prompt_token_ids=PROMPTS["rs2"], adapter=n, params=params) for n in "ab"])
    assert all(r.error is None for r in results)
    assert results[0].token_ids == results[1].token_ids  # same weights, same prompt


def test_request_for_an_unpinned_adapter_when_all_slots_are_pinned_terminates(engine):
    engine.slots.pin("attn4")
    engine.slots.pin("mlp8")
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    engine.add_request(Request(prompt_token_ids=[5, 6, 7], adapter="all16", request_id="lora", params=params))
    engine.add_request(Request(prompt_token_ids=[5, 6, 7], request_id="base", params=params))
    finished = set()
    for _ in range(30):  # generate() would loop forever; a bounded number of steps instead
        finished |= {o.request_id for o in engine.step() if o.finished}
        if not engine.has_unfinished():
            break
    assert finished == {"lora", "base"}  # each completes or fails with an error; none hangs


def test_adapter_files_are_read_off_the_engine_thread_while_others_run(tiny_model, tiny_adapters, monkeypatch):
    """A request whose adapter is not in memory waits while its files are read on the background
    reader thread; the running sequences keep decoding every step meanwhile. (The real reader is
    held on a gate here, standing in for slow storage.)"""
    import threading

    engine = _engine(tiny_model, {"attn4": tiny_adapters["attn4"]})
    gate, readers = threading.Event(), []
    real_load = adapter_slots_module.load_adapter

    def slow_load(*args, **kwargs):
        readers.append(threading.current_thread().name)
        assert gate.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(adapter_slots_module, "load_adapter", slow_load)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine.add_request(Request(prompt_token_ids=[5, 17, 42], params=params, request_id="base"))
    engine.step()  # the base request's prefill
    lora = Request(prompt_token_ids=[7, 8, 9], adapter="attn4", request_id="lora",
                   params=SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.add_request(lora)
    for _ in range(5):
        outputs = engine.step()
        assert [o.request_id for o in outputs] == ["base"]  # decoding on; "lora" waits for its read
    assert readers == [readers[0]] and readers[0].startswith("adapter-read")
    assert [s.request_id for s in engine.scheduler.waiting] == ["lora"]
    gate.set()
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == "lora" for t in o.token_ids]
    alone = _engine(tiny_model, {"attn4": tiny_adapters["attn4"]}).generate([lora])[0]
    assert tokens == alone.token_ids and len(tokens) == 3


def test_an_idle_engine_waits_for_a_pending_read_not_a_finished_one(tiny_model, tiny_adapters, monkeypatch):
    """A finished read nobody took (its request was aborted) must not make `wait_for_reads` return
    at once: an engine with nothing else to run would then spin, keeping the reader off the CPU."""
    import threading
    import time

    engine = _engine(tiny_model, {"attn4": tiny_adapters["attn4"], "mlp8": tiny_adapters["mlp8"]})
    engine.slots.read_ahead(["attn4"])  # read, never acquired
    gate = threading.Event()
    real_load = adapter_slots_module.load_adapter

    def slow_load(*args, **kwargs):
        assert gate.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(adapter_slots_module, "load_adapter", slow_load)
    assert engine.slots.ready("mlp8") is False  # its read starts, held on the gate
    start = time.monotonic()
    engine.slots.wait_for_reads(timeout=0.3)
    assert time.monotonic() - start >= 0.25  # blocked on mlp8's read for the whole timeout
    gate.set()
    engine.slots.wait_for_reads(timeout=30)
    assert engine.slots.ready("mlp8") is True


def test_the_reader_runs_torch_on_one_thread_and_leaves_the_engines_count(tiny_model, tiny_adapters, monkeypatch):
    """A second OpenMP team (the reader's own parallel ops) slows every later engine step, so the
    reader's torch ops run single-threaded; the thread count is per thread, so the engine's stays."""
    import torch

    torch.set_num_threads(2)
    engine = _engine(tiny_model, {"attn4": tiny_adapters["attn4"]})
    seen = []
    real_load = adapter_slots_module.load_adapter

    def load(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(adapter_slots_module, "load_adapter", load)
    engine.slots.read_ahead(["attn4"])
    assert seen == [1]
    assert torch.get_num_threads() == 2


def test_the_reader_faults_in_the_entries_the_next_loads_take(tiny_model, tiny_adapters, monkeypatch):
    """Two adapters of one rank read ahead: each read faults in a different free pool entry, and
    the copies into slots then land in exactly those entries, in every layer."""
    faulted: set[int] = set()
    real = adapter_slots_module.populate

    def recording(tensors):
        faulted.update(t.data_ptr() for t in tensors)
        return real(tensors)

    monkeypatch.setattr(adapter_slots_module, "populate", recording)
    engine = _engine(tiny_model, {"x": tiny_adapters["attn4"], "y": tiny_adapters["attn4"]})
    engine.slots.read_ahead(["x", "y"])
    checked = 0
    for name in ("x", "y"):
        slot = engine.slots.acquire(name)
        for proj, table in engine.slots.tables.items():
            if slot not in table.entries:
                continue
            for layer in range(len(engine.slots.layers[proj])):
                a, b = _entry_weights(engine, slot, proj, layer)
                assert a.data_ptr() in faulted and b.data_ptr() in faulted, (name, proj, layer)
                checked += 1
    assert checked > 0
