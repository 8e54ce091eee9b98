"""Keeps this replica's engine in step with the registry, when other processes change it.

Replicas sharing one registry (`--store postgresql://...`, or several servers on one store
directory) learn of each other's registrations and deletions by polling: every
`--registry-poll-seconds` the adapter list is read (one short query) and compared with what the
engine has registered; new versions are registered (their files fetched from a bucket once,
when blobs live in one) and deleted ones are unregistered (running requests finish first). An
adapter registered on any replica is therefore servable on every replica within one poll
interval plus its validation time. Requests resolve names in the registry itself, so endpoints
(and their switches to a new version) take effect on every replica at once.

A version that does not validate against this replica's base model, or whose files are missing
(a blob directory moved away), is reported once (at start-up by `restore_adapters`, or at the poll
that first sees it) and skipped by the poller until it is deleted. A request naming it retries
registering it (`retry_unservable`) once its blob directory exists again: at most one retry per
version every `RETRY_INTERVAL_S` (2 s), shared by every request that arrives meanwhile, so a flood
of requests for it costs the disk one look every 2 s, and an operator who restores the files gets
the version back without a restart. A new reason is logged; the same one again is not. One that
validates but was trained on another base model is served, and said so in one log line at the
same moment. A registry that cannot be reached is logged and retried on the next poll; the engine
keeps serving what it has.
"""
from __future__ import annotations

import asyncio
import logging
import time

from loraplex.adapters_store.errors import StoreError
from loraplex.adapters_store.store import AdapterStore
from loraplex.server.engine.adapter_errors import AdapterError
from loraplex.server.engine.peft_config import report_base_model

from .server_state import ServerState

log = logging.getLogger("loraplex.registry_sync")

RETRY_INTERVAL_S = 2.0  # between two registration retries of one unservable version


def restore_adapters(engine, store: AdapterStore) -> dict[str, str]:
    """Register every stored adapter version with the engine before serving starts (directly: the
    engine loop is not running yet). Returns the refs not servable on this base model with why,
    each reported once (`ServerState.unservable`: the poller then leaves them alone, and requests
    naming them get that reason)."""
    refused: dict[str, str] = {}
    for record in store.list():
        try:
            _register(engine, record.ref, str(store.local_dir(record)))
        except (AdapterError, OSError) as exc:
            refused[record.ref] = _report_refused(record.ref, exc)
    return refused


class RegistrySync:
    def __init__(self, state: ServerState, interval_s: float) -> None:
        """Refs already found not servable here are in `state.unservable` (see `restore_adapters`)."""
        self.state = state
        self.interval_s = interval_s
        self._unreachable = False

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sync_once()

    async def sync_once(self) -> None:
        store, loop = self.state.store, self.state.engine_loop
        try:
            records = await asyncio.to_thread(store.list)
        except StoreError as exc:
            if not self._unreachable:
                log.warning("registry poll failed (will retry every %.1f s): %s", self.interval_s, exc)
            self._unreachable = True
            return
        if self._unreachable:
            log.info("registry reachable again")
            self._unreachable = False
        wanted = {r.ref: r for r in records}
        have = await loop.call(lambda e: set(e.registered_adapters()))
        for ref in sorted(have - wanted.keys()):
            await loop.call(lambda e, ref=ref: e.unregister_adapter(ref, missing_ok=True))
            log.info("adapter %s was deleted from the registry; unregistered", ref)
        unservable = self.state.unservable
        for ref in unservable.keys() - wanted.keys():
            del unservable[ref]
            self.state.retry_after.pop(ref, None)
        for ref in sorted(wanted.keys() - have - unservable.keys()):
            try:
                path = await asyncio.to_thread(store.local_dir, wanted[ref])
                await loop.call(lambda e, ref=ref, path=path: _register(e, ref, str(path)))
            except (AdapterError, OSError) as exc:
                unservable[ref] = _report_refused(ref, exc)
                continue
            log.info("adapter %s registered from the shared registry", ref)
        self.state.metrics.registered.set(len(records))


async def retry_unservable(state: ServerState, ref: str) -> bool:
    """Whether `ref`, in `state.unservable`, is registered now. Requests arriving while a retry runs
    wait for that one; after it, none starts again for `RETRY_INTERVAL_S`."""
    retry = state.retrying.get(ref)
    if retry is None:
        now = time.monotonic()
        if now < state.retry_after.get(ref, 0.0):
            return False
        state.retry_after[ref] = now + RETRY_INTERVAL_S
        retry = state.retrying[ref] = asyncio.ensure_future(_retry(state, ref))
        retry.add_done_callback(lambda _done: state.retrying.pop(ref, None))
    return await asyncio.shield(retry)  # one request's cancel must not cancel the others' retry


async def _retry(state: ServerState, ref: str) -> bool:
    """Register `ref` if its files are there now; its reason is kept (or replaced, and logged) if not."""
    store = state.store
    try:
        record = await asyncio.to_thread(store.get, ref)
        path = await asyncio.to_thread(store.local_dir, record)
        if not await asyncio.to_thread(path.is_dir):
            return False
        await state.engine_loop.call(lambda e: _register_if_absent(e, ref, str(path)))
    except StoreError:  # deleted since, or the registry is unreachable: the poller settles it
        return False
    except (AdapterError, OSError) as exc:
        if state.unservable.get(ref) != str(exc):
            state.unservable[ref] = _report_refused(ref, exc)
        return False
    state.unservable.pop(ref, None)
    state.retry_after.pop(ref, None)
    log.info("adapter %s is servable again (its files are back): registered", ref)
    return True


def _register_if_absent(engine, ref: str, path: str) -> None:
    if engine.adapter_kind(ref) is None:
        _register(engine, ref, path)


def _report_refused(ref: str, exc: Exception) -> str:
    """Log why `ref` cannot be served here; returns the reason."""
    log.warning("stored adapter %s is not servable on this model: %s", ref, exc)
    return str(exc)


def _register(engine, ref: str, path: str) -> None:
    """Register `ref` with the engine, logging its base-model mismatch (once per version, however
    often it is loaded later). Its values were checked when it was published (reading every stored
    adapter again would stall start-up and the engine thread); each read for a slot checks them
    again and quarantines a version that fails."""
    entry = engine.register_adapter(ref, path, values_checked=True)
    report_base_model(ref, path, entry.summary.get("warnings", []))
