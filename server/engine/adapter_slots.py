"""Adapter residency: disk -> host cache -> device slot.

- Registered adapters are validated once (header and config only) and remembered by name.
- The host cache keeps up to `max_cpu_loras` loaded LoRA adapters, least recently used out.
- `max_loras` device slots hold adapters in the model's rank pools. A slot is reference-counted
  by the running sequences that use it; only unreferenced, unpinned slots are evicted, least
  recently used first. An adapter is loaded into a slot on demand.
- Reading an adapter's files (disk -> host) happens on a background thread: the scheduler asks
  `ready(name)` before admitting a request, which starts the read and keeps the request waiting
  until it is done, so the engine thread only does the short copy into a slot and running
  streams do not stall while adapters load. On a CPU the read runs in slices between the
  engine's steps (`interleave`) and faults in the pool entry the adapter will take (`prefault`).
  While sequences decode, the scheduler admits at most one sequence per step whose adapter is
  not `is_resident`, so copies do not pile up in one step.
- Soft prompts are small: once registered they stay on the device.
- Values (adapter_values.py): registering reads the adapter and refuses non-finite or absurd
  values, unless the caller checked that directory already (`check_in_background`, which the
  Admin service runs before the registry stores an adapter); every read for a slot checks again.
  An adapter found bad when read, or that made a request go non-finite (the engine says so), is
  `quarantine`d: refused (FAILED_PRECONDITION) until registered again.
"""
from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from .adapter_errors import AdapterError, AdapterQuarantined, SlotsExhausted
from .adapter_format import BaseModelShape, module_name
from .adapter_values import AdapterValueError, BaseNorms, check_soft_prompt, check_update, check_values
from .adapters import LoraAdapter, SoftPrompt, inspect_adapter, load_adapter
from .engine_stats import ADAPTER_LOAD, EngineEvent, EventLog
from .interleave import Interleaver
from .lora_batch import RankTable
from .lora_layer import LoraLinear, store
from .prefault import populate
from .safetensors_file import Pace, slices_of


_registrations = itertools.count()


@dataclass
class Registered:
    name: str
    path: str
    kind: str  # "lora" | "soft_prompt"
    summary: dict = field(default_factory=dict)
    serial: int = field(default_factory=lambda: next(_registrations))  # tells re-registrations of a name apart


class AdapterSlots:
    def __init__(
        self,
        base: BaseModelShape,
        layers: dict[str, list[LoraLinear]],
        max_loras: int,
        max_cpu_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        norms: BaseNorms,
        events: EventLog | None = None,
    ) -> None:
        """layers[projection][i] is the LoraLinear holding that projection in layer i; `norms`: the
        base model's sizes adapter values are checked against; `events`: where each load's duration
        is recorded (the engine's log, which observers read)."""
        self.base = base
        self.norms = norms
        self.layers = layers
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        # on a CPU untouched memory costs nothing: pools are made at full size (see lora_batch)
        reserve = max_loras if device.type == "cpu" else None
        self.tables = {proj: RankTable(reserve) for proj in layers}
        self.registered: dict[str, Registered] = {}
        self.soft_prompts: dict[str, SoftPrompt] = {}
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._reading: dict[str, tuple[str, Future]] = {}  # name -> (path, its background read)
        # made now (it starts no thread yet): the Admin service's threads submit to it too
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-read", initializer=_one_omp_thread)
        self.gate = Interleaver(enabled=device.type == "cpu")  # reads run between engine steps
        self._prefaulted: dict[tuple[str, int], set[int]] = {}  # pool entries the reader faulted in
        self._slot_of: dict[str, int] = {}
        self._name_in: list[str | None] = [None] * max_loras
        self._refs = [0] * max_loras
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced occupied slots, oldest first
        self.pinned: set[str] = set()
        self.quarantined: dict[str, str] = {}  # name -> why it is refused until registered again
        self.loads = 0  # adapters copied into a slot
        self.evictions = 0
        self.hits = 0  # acquisitions of an adapter already resident
        self.misses = 0  # acquisitions that had to load it
        self.load_failures = 0
        self.events = events if events is not None else EventLog()
        self.version = 0  # changes whenever pool contents or slot entries change

    # registration -----------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike, values_checked: bool = False) -> Registered:
        """Validate an adapter directory and make it servable under `name` (replacing an older one,
        and lifting a quarantine). Its values are read and checked too, unless `values_checked`:
        the caller checked this very directory already (`check_in_background`)."""
        summary = inspect_adapter(path, self.base, self.max_rank)
        entry = Registered(name, str(path), summary["kind"], summary)
        if entry.kind == "soft_prompt":
            prompt = self._load_checked(path, name)
            prompt.embeddings = prompt.embeddings.to(self.device)
            self.soft_prompts[name] = prompt
        elif not values_checked:
            self._load_checked(path, name)
        self._drop(name)
        self.quarantined.pop(name, None)
        self.registered[name] = entry
        return entry

    def _load_checked(self, path: str | os.PathLike, name: str, pace: Pace = nullcontext) -> LoraAdapter | SoftPrompt:
        """Read an adapter (`load_adapter`) and check its values; raises AdapterError."""
        adapter = load_adapter(path, name, self.base, self.max_rank, self.dtype, pace=pace)
        check_values(adapter, self.norms, pace)
        return adapter

    def check_in_background(self, path: str | os.PathLike, name: str) -> Future:
        """Read and check adapter `name` at `path` on the reader thread (one torch thread, in slices
        between the engine's steps): for a caller off the engine thread, such as the Admin service
        vetting an upload before the registry stores it. The future raises what the check raised."""
        return self._reader.submit(self._check_read, path, name)

    def _check_read(self, path: str | os.PathLike, name: str) -> None:
        with self.gate.job():
            self._load_checked(path, name, pace=self.gate.slice)

    def unregister(self, name: str) -> None:
        """Forget `name`; a slot still used by running sequences is freed when they finish."""
        if name not in self.registered:
            raise KeyError(name)
        self._drop(name)
        del self.registered[name]
        self.soft_prompts.pop(name, None)
        self.quarantined.pop(name, None)

    # quarantine ---------------------------------------------------------------------------
    def quarantine(self, name: str, reason: str) -> None:
        """Refuse `name` until it is registered again: it leaves the host cache and its slot (a
        slot still referenced is freed when its sequences are)."""
        if name in self.registered:
            self._drop(name)
            self.quarantined[name] = reason

    def check_servable(self, name: str) -> None:
        """Raise AdapterQuarantined when `name` is quarantined."""
        if name in self.quarantined:
            raise self.quarantine_error(name)

    def quarantine_error(self, name: str) -> AdapterQuarantined:
        """The refusal of a request naming quarantined `name`, saying why and what to do."""
        kind = "soft prompt" if self.kind(name) == "soft_prompt" else "adapter"
        return AdapterQuarantined(f"{kind} {name!r} is quarantined: {self.quarantined[name]}. It is refused "
                                  "until it is registered again with sound weights")

    def problem(self, name: str) -> str | None:
        """Why the values `name` holds now (its slot's pool entries, or its soft-prompt vectors) are
        not servable, or None (also when it is not resident): the same checks as a read, on the
        device copy, for merging and for finding what made a request go non-finite."""
        try:
            if self.kind(name) == "soft_prompt":
                check_soft_prompt(self.soft_prompts[name].embeddings, self.norms.embedding_row,
                                  f"soft prompt {name!r}")
            elif name in self._slot_of:
                self._check_slot(name, self._slot_of[name])
        except AdapterValueError as exc:
            return str(exc)
        return None

    def _check_slot(self, name: str, slot: int) -> None:
        for proj, table in self.tables.items():
            if slot not in table.entries:
                continue
            rank, entry = table.entries[slot]
            for i, layer in enumerate(self.layers[proj]):
                a_pool, b_pool = layer.pools[proj][rank]
                check_update(a_pool[entry], b_pool[entry], self.norms.weights[(i, proj)],
                             f"adapter {name!r}: {module_name(i, proj)}")

    def _drop(self, name: str) -> None:
        self._host.pop(name, None)
        self._reading.pop(name, None)  # a read in flight finishes unseen
        self.pinned.discard(name)
        slot = self._slot_of.get(name)
        if slot is not None and self._refs[slot] == 0:
            self._evict(slot)
        elif slot is not None:  # still in use: detach the name, the slot is freed on release
            del self._slot_of[name]
            self._name_in[slot] = f"\0retired:{name}"

    def cache_key(self, name: str | None) -> str:
        """What a prefix-cache key holds of adapter or soft prompt `name`: this registration of it."""
        return "" if name is None else f"{name}#{self.registered[name].serial}"

    def kind(self, name: str) -> str | None:
        entry = self.registered.get(name)
        return entry.kind if entry else None

    # slots --------------------------------------------------------------------------------
    def resident(self) -> list[str]:
        return [n for n in self._name_in if n is not None and not n.startswith("\0")]

    def is_resident(self, name: str) -> bool:
        """Whether `name` holds a slot already (acquiring it copies nothing)."""
        return name in self._slot_of

    def acquire(self, name: str) -> int | None:
        """Reference `name`'s slot, loading it first if needed; None while every slot is held by
        running sequences (one frees when they finish). Raises when no slot can ever free up."""
        self.check_servable(name)
        slot = self._slot_of.get(name)
        if slot is None:
            if self.kind(name) != "lora":
                raise AdapterError(f"unknown LoRA adapter {name!r}")
            slot = self._free_slot()
            if slot is None:
                return None
            self.misses += 1
            start = time.perf_counter()
            try:
                self._load(name, slot)
            except AdapterValueError as exc:  # its file holds bad values now: refuse it from here on
                self.load_failures += 1
                self.quarantine(name, f"reading it found: {exc}")
                raise self.quarantine_error(name) from None
            except Exception:
                self.load_failures += 1
                raise
            self.events.record(EngineEvent(ADAPTER_LOAD, name, time.perf_counter() - start))
        else:
            self.hits += 1
        if self._refs[slot] == 0:
            self._lru.pop(slot, None)
        self._refs[slot] += 1
        return slot

    def ready(self, name: str) -> bool:
        """Whether `acquire(name)` can run without reading files on the calling thread: the adapter
        is resident or host-cached, or its background read has finished (even with an error, which
        `acquire` then raises). Otherwise starts that read, if it is not running yet."""
        entry = self.registered.get(name)
        if (name in self._slot_of or name in self._host or entry is None or entry.kind != "lora"
                or name in self.quarantined):
            return True
        pending = self._reading.get(name)
        if pending is None or pending[0] != entry.path:
            if self.device.type == "cpu":
                self._open_rank_classes(entry.summary.get("ranks", {}))
            future = self._reader.submit(self._read, entry.path, name)
            self._reading[name] = (entry.path, future)
            return False
        return pending[1].done()

    def _read(self, path: str, name: str) -> LoraAdapter:
        """On the reader thread, in slices between the engine's steps (`interleave`): read the
        adapter, then fault in the pool entries it will likely take, so the engine's copy into
        them writes memory that is already there."""
        with self.gate.job():
            adapter = self._load_checked(path, name, pace=self.gate.slice)
            if self.device.type == "cpu" and isinstance(adapter, LoraAdapter):
                self._prefault(adapter)
        return adapter

    def _prefault(self, adapter: LoraAdapter) -> None:
        pieces = []  # each layer's (A, B) entry
        for proj, rank in adapter.ranks.items():
            entry = self._entry_to_prefault(proj, rank)
            for layer in self.layers[proj] if entry is not None else ():
                pools = layer.pools[proj].get(rank)
                if pools is not None and entry < pools[0].shape[0]:
                    pieces.append([pools[0][entry], pools[1][entry]])
        for group in slices_of(pieces, lambda ab: ab[0].nbytes + ab[1].nbytes):
            with self.gate.slice():
                if not populate([t for ab in group for t in ab]):
                    return

    def _entry_to_prefault(self, proj: str, rank: int) -> int | None:
        """The first free entry of this rank class (in the order `assign` hands them out) that no
        earlier read has faulted in. Reads from the reader thread what the engine thread changes:
        a stale answer only faults in an entry a later adapter takes."""
        table = self.tables[proj]
        done = self._prefaulted.setdefault((proj, rank), set())
        for entry in reversed(list(table.free_entries(rank))):
            if entry not in done:
                done.add(entry)
                return entry
        return None

    def read_ahead(self, names: list[str]) -> None:
        """Start reading these adapters' files in the background and wait for all of them:
        for offline workloads that should start as one batch."""
        for name in set(names):
            self.ready(name)
        wait([future for _, future in self._reading.values()])

    def wait_for_reads(self, timeout: float) -> None:
        """Block until a background read finishes (or `timeout` seconds): for an engine with nothing
        else to run. Reads already done (one for a request aborted since) do not count: waiting on
        them returns at once, and the engine would spin instead of letting the reader run."""
        pending = [future for _, future in self._reading.values() if not future.done()]
        if pending:
            wait(pending, timeout=timeout, return_when="FIRST_COMPLETED")

    def release(self, slot: int) -> None:
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            name = self._name_in[slot]
            if name is not None and name.startswith("\0"):
                self._evict(slot)
            elif name not in self.pinned:
                self._lru[slot] = None

    def pin(self, name: str) -> int:
        """Keep `name` resident until unpinned; raises when no slot can be freed."""
        slot = self.acquire(name)
        if slot is None:
            raise AdapterError(f"cannot pin {name!r}: every one of the {self.max_loras} slots is in use or pinned")
        self.pinned.add(name)
        self.release(slot)
        return slot

    def unpin(self, name: str) -> None:
        self.pinned.discard(name)
        slot = self._slot_of.get(name)
        if slot is not None and self._refs[slot] == 0:
            self._lru[slot] = None

    def _free_slot(self) -> int | None:
        for slot, name in enumerate(self._name_in):
            if name is None:
                return slot
        if not self._lru:
            if not any(self._refs):
                raise SlotsExhausted(f"all {self.max_loras} adapter slots are pinned; unpin one or raise --max-loras")
            return None
        slot = next(iter(self._lru))
        self._evict(slot)
        return slot

    def _evict(self, slot: int) -> None:
        name = self._name_in[slot]
        self._lru.pop(slot, None)
        for table in self.tables.values():
            if slot in table.entries:
                table.release(slot)
        if name is not None and not name.startswith("\0"):
            self._slot_of.pop(name, None)
        self._name_in[slot] = None
        self.evictions += 1
        self.version += 1

    def _host_copy(self, name: str) -> LoraAdapter:
        adapter = self._host.get(name)
        if adapter is None:
            entry = self.registered[name]
            pending = self._reading.pop(name, None)
            if pending is not None and pending[0] == entry.path:
                adapter = pending[1].result()  # raises what the read raised
            else:
                adapter = self._load_checked(entry.path, name)
            self._host[name] = adapter
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        self._host.move_to_end(name)
        return adapter

    def _load(self, name: str, slot: int) -> None:
        adapter = self._host_copy(name)
        self.version += 1
        try:
            self._write(adapter, slot)
        except Exception:
            for table in self.tables.values():
                if slot in table.entries:
                    table.release(slot)
            raise
        self._slot_of[name] = slot
        self._name_in[slot] = name
        self.loads += 1

    def _write(self, adapter: LoraAdapter, slot: int) -> None:
        """Copy the adapter into its pool entries, all layers in one `store`."""
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        zeros: list[torch.Tensor] = []
        for proj, rank in adapter.ranks.items():
            entry, grew = self.tables[proj].assign(slot, rank)
            if grew:
                self._grow_pools(proj, rank)
            for i, layer in enumerate(self.layers[proj]):
                a, b = adapter.weights.get((i, proj), (None, None))
                layer_copies, layer_zeros = layer.plan_write(proj, rank, entry, a, b)
                copies += layer_copies
                zeros += layer_zeros
        store(copies, zeros)

    def _grow_pools(self, proj: str, rank: int) -> None:
        capacity = self.tables[proj].capacity[rank]
        for layer in self.layers[proj]:
            layer.ensure_capacity(proj, rank, capacity, self.dtype, self.device)

    def _open_rank_classes(self, ranks: dict[str, int]) -> None:
        """Make the (full-size, untouched) CPU pools of these rank classes now, on the engine
        thread, so the reader can fault in the entries an adapter being read will take."""
        for proj, rank in ranks.items():
            table = self.tables.get(proj)
            if table is not None and table.reserve and rank not in table.capacity:
                table.grow(rank)
                self._grow_pools(proj, rank)


def _one_omp_thread() -> None:
    """The adapter-read thread's torch ops run on it alone (the thread count is per thread under
    OpenMP). Otherwise its first parallel op starts a second OpenMP team, and from then on, with
    more OpenMP threads than cores, libgomp makes every waiting thread sleep almost at once instead
    of spinning: each of the engine's hundreds of parallel ops per step then waits for its threads
    to wake (measured: base decode steps 34 -> 58 ms for the rest of the process).

    On a CPU the reader's heavy work runs only between steps (`interleave`), so it needs no lower
    priority: at nice 10 it could sit behind a spinning OpenMP thread while the engine waited."""
    torch.set_num_threads(1)
