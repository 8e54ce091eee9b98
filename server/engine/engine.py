"""The engine: one resident base model, many adapters, continuous batching.

    engine = Engine(EngineConfig(model=...))
    engine.register_adapter("sql", "/adapters/sql")        # LoRA or soft prompt, kind from its config
    engine.add_request(Request(prompt="...", adapter="sql"))
    while engine.has_unfinished():
        for out in engine.step(): ...                         # deltas per request

Not thread-safe: one thread drives `step`; the server front hands requests over to it.

The methods here are the engine's whole face: fronts register, pin and inspect adapters, count
the queue and the batch, and observers read `stats()` (an immutable snapshot of every counter)
and `events(cursor)` (see engine_stats.py). The scheduler, adapter slots, block manager, runner
and merger are the engine's own; tests/test_boundaries.py keeps the server's fronts off them.

Isolation (DESIGN.md): nothing one request does may change another's output. Adapter values are
checked when registered and read (adapter_values.py); masked KV positions hold zeros
(block_manager.py); and a request whose hidden state or logits go non-finite anyway fails alone
with INTERNAL, in the step it happens (`_fail_non_finite`): its blocks leave the prefix cache,
and the adapter or soft prompt that made it so is quarantined (refused with FAILED_PRECONDITION
until registered again), never merged, and the requests waiting on it fail with it.
"""
from __future__ import annotations

import os
import uuid
from concurrent.futures import Future

import torch

from loraplex.kernels import get_lora_ops

from . import loader
from .adapter_errors import AdapterError, AdapterQuarantined
from .adapter_format import FUSED, BaseModelShape
from .adapter_slots import AdapterSlots, Registered
from .adapter_values import AdapterValueError, BaseNorms
from .adapters import inspect_adapter
from .block_manager import BlockManager
from .config import EngineConfig
from .engine_stats import EngineStats, EventLog, EventPage
from .intake import Intake, RequestError
from .merger import Merger
from .merging import MergePolicy
from .model import CausalLM
from .model_config import spec_from_hf_config
from .model_runner import ModelRunner
from .quantize import prepack_supported
from .sampler import Sampler, TokenLogprob, token_logprobs
from .scheduler import Scheduler
from .scoring import record, scores_of
from .sequence import Chunk, Request, RequestOutput, Sequence, Status
from .workload import Completion, Workload


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        # first: on a CPU the Triton path must set up its interpreter before anything imports triton
        self.ops = get_lora_ops(config.kernels, self.device)
        self.model_path = loader.resolve_model(config.model)
        self.spec = spec_from_hf_config(loader.load_config(self.model_path), str(config.model or self.model_path))
        self.tokenizer = loader.load_tokenizer(self.model_path)
        self.max_model_len = self._context_limit()
        weights = loader.load_weights(self.model_path, self.dtype)
        norms = BaseNorms.of(weights, self.spec.num_layers)  # before the model takes the weights over
        self.prepacked = self._prepack()
        self.model = CausalLM(self.spec, weights, config.quantize, self.device, self.max_model_len, self.prepacked)
        self.blocks = BlockManager(-(-config.max_total_tokens // config.block_size), config.block_size)
        self._events = EventLog()  # what observers read beside the counters (see engine_stats.py)
        self.slots = AdapterSlots(
            BaseModelShape(self.spec.num_layers, self.spec.hidden_size, self.spec.projection_shapes(),
                           self.spec.name_or_path),
            self._projection_layers(), config.max_loras, config.max_cpu_loras, config.max_lora_rank,
            self.dtype, self.device, norms=norms, events=self._events,
        )
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_running, config.max_batch_tokens,
                                   config.chunk_tokens())
        policy = MergePolicy(dynamic=config.dynamic_merge, high=config.merge_high, low=config.merge_low,
                             patience=config.merge_patience)
        self.merger = Merger(self.model.lora_layers(), self.slots, self.ops, self.dtype, self.device,
                             config.quantize != "none", policy)
        self.runner = ModelRunner(self.model, self.blocks, self.slots, self.ops, self.device, self.dtype, self.merger)
        self.sampler = Sampler()
        self.intake = Intake(self.tokenizer, self.spec.vocab_size, self.max_model_len, self.slots, self.blocks,
                             config.prefix_caching)
        self.eos_ids = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._seqs: dict[str, list[Sequence]] = {}  # request id -> its unfinished sequences (n per request)
        self._newly_quarantined: set[str] = set()  # whose unfinished requests have yet to be failed

    def _prepack(self) -> bool:
        """Whether unquantized projections run on oneDNN-prepacked weights (see quantize.py)."""
        supported = prepack_supported(self.dtype, self.device)
        if self.config.cpu_matmul == "onednn" and not supported:
            raise ValueError(f"--cpu-matmul onednn needs a CPU with oneDNN and float32 or bfloat16; "
                             f"this engine runs {self.config.dtype} on {self.device}")
        return supported and self.config.cpu_matmul != "torch"

    def _context_limit(self) -> int:
        limit = self.spec.max_position_embeddings
        if self.spec.sliding_window:  # attention spans the whole context, so stay within the window
            limit = min(limit, self.spec.sliding_window)
        if self.config.max_model_len:
            limit = min(limit, self.config.max_model_len)
        return limit

    def _projection_layers(self) -> dict[str, list]:
        return {
            proj: [layer.proj[fused] for layer in self.model.layers]
            for fused, projs in FUSED.items()
            for proj in projs
        }

    # adapters --------------------------------------------------------------------------
    def register_adapter(self, name: str, path: str, values_checked: bool = False) -> Registered:
        """Validate and register a PEFT adapter (LoRA or soft prompt); raises AdapterError. Its
        values are read and checked (adapter_values.py) unless `values_checked`: the caller checked
        this directory already (`check_adapter_values`, or the registry that stored it did)."""
        return self.slots.register(name, path, values_checked)

    def unregister_adapter(self, name: str, missing_ok: bool = False) -> None:
        """Forget `name` (running sequences finish on it first); KeyError if it is not registered,
        unless `missing_ok` (another path, such as the registry poller, may have been first)."""
        if missing_ok and name not in self.slots.registered:
            return
        self.merger.forget(name)
        self.slots.unregister(name)

    def inspect_adapter(self, path: str | os.PathLike) -> dict:
        """Validate an adapter directory's header and config against the served model, without
        registering it: its summary (kind, ranks, size, warnings); raises AdapterError."""
        return inspect_adapter(path, self.slots.base, self.config.max_lora_rank)

    def check_adapter_values(self, path: str | os.PathLike, name: str) -> Future:
        """Read and check the values of adapter `name` at `path` on the adapter-reader thread (one
        torch thread, between steps); the future raises AdapterError. Safe from any thread."""
        return self.slots.check_in_background(path, name)

    def pin_adapter(self, name: str) -> None:
        """Keep LoRA adapter `name` in a device slot until unpinned (loading it now); raises
        AdapterQuarantined, or AdapterError when no slot can be freed."""
        self.slots.pin(name)

    def unpin_adapter(self, name: str) -> None:
        """Let `name`'s slot be evicted again (nothing happens if it was not pinned)."""
        self.slots.unpin(name)

    def adapter_kind(self, name: str) -> str | None:
        """"lora" or "soft_prompt" for a registered adapter, else None."""
        return self.slots.kind(name)

    def registered_adapters(self) -> frozenset[str]:
        return frozenset(self.slots.registered)

    def residency(self, name: str) -> str | None:
        """Where registered adapter `name` is: "pinned" (held in a device slot), "resident" (in a
        slot, evictable) or "registered" (on disk or in the host cache; a soft prompt, which needs no
        slot, too); None when it is not registered."""
        if name in self.slots.pinned:
            return "pinned"
        if self.slots.is_resident(name):
            return "resident"
        return "registered" if name in self.slots.registered else None

    # merging ---------------------------------------------------------------------------
    def merge_adapter(self, name: str, static: bool = False) -> None:
        """Serve LoRA adapter `name` from merged copies of the layers it touches (see merger.py);
        static: keep it merged (dynamic merging then leaves it alone). An adapter whose values are not
        servable (see `AdapterSlots.problem`) is refused and quarantined: merged, it would reach every
        row of the batch."""
        try:
            self.merger.merge(name, static)
        except AdapterValueError as exc:
            self._quarantine(name, f"it was to be merged, and {exc}")
            raise AdapterQuarantined(f"cannot merge {name!r}: {exc}; it is quarantined until registered "
                                     "again") from None

    def unmerge_adapter(self) -> None:
        """Back to the base weights for every layer (the merged copies are dropped)."""
        self.merger.unmerge()

    def _follow_merge_policy(self, running: list[Sequence]) -> None:
        want = self.merger.wanted([s.adapter for s in running])
        if want == self.merger.merged:
            return
        if want is None:
            self.merger.unmerge()
            return
        try:
            self.merge_adapter(want)
        except AdapterQuarantined:  # its values were bad: quarantined, and its requests fail this step
            pass

    def _quarantine(self, name: str, reason: str) -> None:
        """Refuse `name` until it is registered again (unmerged first, if merged); its unfinished
        requests fail at `_fail_quarantined`."""
        if name in self.slots.quarantined or name not in self.slots.registered:
            return
        self.merger.forget(name)
        self.slots.quarantine(name, reason)
        self._newly_quarantined.add(name)

    # requests --------------------------------------------------------------------------
    def add_request(self, request: Request) -> str:
        """Queue a request (n sequences for n completions); raises RequestError when it cannot
        run as given."""
        first = self._sequence(request)
        group = [first] + [self.intake.sibling(first, i) for i in range(1, first.params.n)]
        self._seqs[first.request_id] = group
        for seq in group:
            self.scheduler.add(seq)
        return first.request_id

    def _sequence(self, request: Request) -> Sequence:
        request_id = request.request_id or uuid.uuid4().hex
        return self.intake.sequence(request, request_id, in_flight=request_id in self._seqs)

    def encode(self, request: Request) -> Request:
        """The request with its prompt or chat turned into token ids. Safe to call from another
        thread (it only reads the tokenizer), so fronts tokenize off the engine's thread."""
        return self.intake.encode(request)

    def abort(self, request_id: str) -> bool:
        group = self._seqs.pop(request_id, None)
        if group is None:
            return False
        for seq in group:
            self.scheduler.finish(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def num_waiting(self) -> int:
        """Sequences queued, not yet admitted (n per request of n completions). Safe from any
        thread: it only reads the queue's length."""
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def running_requests(self) -> list[str]:
        """The ids of the requests with a sequence in the running batch, in admission order."""
        return list(dict.fromkeys(s.request_id for s in self.scheduler.running))

    def running_adapters(self) -> frozenset[str]:
        return frozenset(s.adapter for s in self.scheduler.running if s.adapter)

    # observing ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of every counter and of the queue, batch, KV cache and adapters now."""
        slots, scheduler = self.slots, self.scheduler
        return EngineStats(
            waiting=len(scheduler.waiting), running=len(scheduler.running), kv_blocks=self.blocks.num_blocks,
            kv_blocks_free=self.blocks.num_free, adapter_loads=slots.loads, adapter_evictions=slots.evictions,
            adapter_hits=slots.hits, adapter_misses=slots.misses, adapter_load_failures=slots.load_failures,
            merge_switches=self.merger.switches, reused_prompt_tokens=scheduler.reused_tokens,
            preemptions=scheduler.num_preemptions, max_loras=slots.max_loras,
            resident_adapters=tuple(slots.resident()), running_adapters=self.running_adapters(),
            waiting_adapters=frozenset(s.adapter for s in scheduler.waiting if s.adapter),
            merged_adapter=self.merger.merged,
        )

    def events(self, since: int = 0) -> EventPage:
        """The events recorded from cursor `since` on (such as each adapter load's duration), the
        cursor to pass next time, and how many this reader missed because it fell behind."""
        return self._events.since(since)

    # stepping --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        with self.slots.gate.step():  # adapter reads run between steps, not beside them
            outputs, idle = self._step()
        if idle:  # only adapters being read: wait for one rather than spin
            self.slots.wait_for_reads(timeout=0.05)
        return outputs

    def _step(self) -> tuple[list[RequestOutput], bool]:
        """-> (outputs, whether nothing could run)."""
        outputs = self._fail_quarantined()  # a merge between steps found an adapter's values bad
        chunks, failed = self.scheduler.schedule()
        outputs += [out for seq, error, code in failed if (out := self._failure(seq, error, code)) is not None]
        chunks = _unfinished(chunks)  # a sibling failed: the request is over
        if chunks and self.merger.policy.dynamic:
            self._follow_merge_policy(self.scheduler.running)
            outputs += self._fail_quarantined()  # the adapter it was to merge had bad values
            chunks = _unfinished(chunks)
        if not chunks:
            return outputs, not outputs
        logits, seqs, failures = self._forward(chunks)
        outputs += failures + self._scored(chunks)
        if not seqs:  # every chunk stopped short of its sequence's end: nothing to sample
            return outputs, False
        tokens = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs]
        logprobs = dict(zip(wanted, token_logprobs(logits, tokens, wanted, [seqs[i].params.top_logprobs
                                                                            for i in wanted])))
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            outputs.append(self._advance(seq, token, logprobs.get(i)))
        return outputs, False

    def _forward(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[Sequence], list[RequestOutput]]:
        """Run the step's chunks -> (logits, the sequences that sample, in the logits' row order,
        failures). A sequence whose values went non-finite fails here, before `computed` could
        enter its blocks into the prefix cache, and its rows leave the logits."""
        logits, seqs = self.runner.run(chunks)
        failures: list[RequestOutput] = []
        if self.runner.non_finite:
            failures = self._fail_non_finite(self.runner.non_finite) + self._fail_quarantined()
            chunks = _unfinished(chunks)
            rows = [i for i, s in enumerate(seqs) if s.status is not Status.FINISHED]
            logits, seqs = logits[rows], [seqs[i] for i in rows]
        self.scheduler.computed(chunks)
        return logits, seqs, failures

    def _scored(self, chunks: list[Chunk]) -> list[RequestOutput]:
        """Keep the scoring chunks' log-probabilities; finish each scoring sequence now computed."""
        live = [c for c in chunks if c.seq.score_from is not None and c.seq.status is not Status.FINISHED]
        for span in self.runner.scored if live else []:
            record(span)
        done = [c.seq for c in live if c.end == c.seq.num_tokens]
        for seq in done:
            self.scheduler.finish(seq)
            self._retire(seq)
        return [RequestOutput(s.request_id, finished=True, finish_reason="length", prompt_tokens=len(s.prompt_ids),
                              prompt_logprobs=scores_of(s), context_ids=s.prompt_ids[:s.score_from]) for s in done]

    def _fail_non_finite(self, failing: list[Sequence]) -> list[RequestOutput]:
        """Fail each sequence whose values went non-finite in this step, alone (INTERNAL), and
        quarantine what it applied that is to blame (see `_blame`)."""
        outputs = []
        for seq in failing:
            if seq.status is Status.FINISHED:  # a sibling failed first: the request is over
                continue
            blamed = self._blame(seq)
            out = self._fail(seq, self._non_finite_error(seq, blamed), "INTERNAL")
            outputs += [out] if out is not None else []
            for name, problem in blamed.items():
                self._quarantine(name, f"request {seq.request_id!r} on it went non-finite"
                                       + (f" ({problem})" if problem else ""))
        return outputs

    def _blame(self, seq: Sequence) -> dict[str, str | None]:
        """What `seq` applied (adapter, soft prompt) -> what is wrong with its values, if anything is
        found. When neither is found at fault, both are blamed: they produced the values."""
        named = [n for n in (seq.adapter, seq.soft_prompt_name) if n is not None]
        problems = {n: self.slots.problem(n) for n in named}
        found = {n: p for n, p in problems.items() if p is not None}
        return found or problems

    @staticmethod
    def _non_finite_error(seq: Sequence, blamed: dict[str, str | None]) -> str:
        applied = " and ".join(f"{'soft prompt' if n == seq.soft_prompt_name else 'adapter'} {n!r}" for n in blamed)
        what = f"with {applied}" if applied else "on the base model alone"
        then = (f"; quarantined until registered again: {applied}" if applied
                else "; no adapter was involved: check the model's weights")
        found = "; ".join(p for p in blamed.values() if p)
        return (f"request {seq.request_id!r} failed: its hidden state or logits went non-finite (NaN, inf, or too "
                f"large for the model's norm) {what}; the other requests are unaffected{then}"
                + (f". Found: {found}" if found else ""))

    def _fail_quarantined(self) -> list[RequestOutput]:
        """Fail (FAILED_PRECONDITION) the unfinished requests on what was quarantined since the last call."""
        if not self._newly_quarantined:
            return []
        names, self._newly_quarantined = self._newly_quarantined, set()
        outputs = []
        for group in list(self._seqs.values()):
            name = next((n for n in (group[0].adapter, group[0].soft_prompt_name) if n in names), None)
            if name is not None:
                error = str(self.slots.quarantine_error(name))
                out = self._fail(group[0], error, AdapterQuarantined.status)
                outputs += [out] if out is not None else []
        return outputs

    def _fail(self, seq: Sequence, error: str, code: str) -> RequestOutput | None:
        """Fail `seq`'s whole request now: the blocks of its sequences leave the prefix cache (their
        values may be bad) and are freed."""
        for member in self._seqs.get(seq.request_id, [seq]):
            self.blocks.forget(member.block_table)
        self.scheduler.finish(seq)
        return self._failure(seq, error, code)

    def _failure(self, seq: Sequence, error: str, code: str) -> RequestOutput | None:
        """A sequence the scheduler could not run fails its whole request (None: already failed)."""
        group = self._seqs.pop(seq.request_id, None)
        if group is None:
            return None
        for other in group:
            if other is not seq:
                self.scheduler.finish(other)
        return RequestOutput(seq.request_id, finished=True, finish_reason="error", error=error, error_code=code,
                             prompt_tokens=len(seq.prompt_ids), index=seq.index)

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        detok = seq.detokenizer
        detok.add(token)
        params = seq.params
        if detok.stopped:
            seq.finish_reason = "stop"
        elif token in self.eos_ids and not params.ignore_eos:
            seq.finish_reason = "eos"
        elif len(seq.output_ids) >= params.max_new_tokens:
            seq.finish_reason = "length"
        request_done = False
        if seq.finish_reason is not None:
            if seq.finish_reason != "stop":
                detok.flush()
            self.scheduler.finish(seq)
            request_done = self._retire(seq)
        return self._delta(seq, request_done)

    def _retire(self, seq: Sequence) -> bool:
        """Forget a finished sequence; True when it was its request's last."""
        group = self._seqs.get(seq.request_id, [])
        if seq in group:
            group.remove(seq)
        if group:
            return False
        self._seqs.pop(seq.request_id, None)
        return True

    def _delta(self, seq: Sequence, request_done: bool) -> RequestOutput:
        """Text, ids and logprobs that became final since the last output of `seq`."""
        detok = seq.detokenizer
        text, ids = detok.text, detok.token_ids
        final_ids = len(ids) if seq.status is Status.FINISHED else detok.num_final_ids
        out = RequestOutput(
            seq.request_id,
            text=text[seq.sent_text:],
            token_ids=ids[seq.sent_ids:final_ids],
            finished=request_done,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(ids),
            index=seq.index,
            logprobs=seq.logprobs[seq.sent_ids:final_ids],
        )
        seq.sent_text = len(text)
        seq.sent_ids = max(seq.sent_ids, final_ids)
        return out

    # offline ---------------------------------------------------------------------------
    def prompt_logits(self, requests: list[Request]) -> list[torch.Tensor]:
        """Teacher-forced logits [len(prompt), vocab] at every real position of every request,
        all requests in one mixed prefill batch (for parity tests and scoring)."""
        seqs = [self._sequence(r) for r in requests]
        try:
            for seq in seqs:
                if seq.adapter is not None:
                    slot = self.slots.acquire(seq.adapter)
                    if slot is None:
                        raise RequestError("more distinct adapters than --max-loras slots in one batch")
                    seq.slot = slot
                self.blocks.allocate(seq.block_table, seq.num_tokens)
            logits = self.runner.run_all_positions(seqs)
        finally:
            for seq in seqs:
                self.scheduler.finish(seq)
        per_seq = logits.split([s.num_tokens for s in seqs])
        return [x[s.num_virtual:] for x, s in zip(per_seq, seqs)]

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Run all requests together as one workload; results in input order, a request with
        n > 1 giving its n completions in a row. A request that is refused or fails gets its
        error; the others complete."""
        workload = Workload()
        for request in requests:
            try:
                request_id = self.add_request(request)
            except (RequestError, AdapterError) as exc:
                workload.refused(request, exc)
                continue
            workload.queued(request_id, self._seqs[request_id])
        # the whole workload is known: read its adapters first, so it starts as one mixed batch
        self.slots.read_ahead([r.adapter for r in requests if r.adapter])
        while self.has_unfinished():
            for out in self.step():
                workload.add(out)
        return workload.results

def _unfinished(chunks: list[Chunk]) -> list[Chunk]:
    """The chunks whose sequence has not finished (failed) since they were scheduled."""
    return [c for c in chunks if c.seq.status is not Status.FINISHED]
