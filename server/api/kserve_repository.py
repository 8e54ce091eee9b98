"""The KServe v2 model-repository extension, mapped onto the adapter registry and device slots.

- RepositoryIndex lists every registered adapter version. Each one serves requests (LoRA
  weights load into a slot on demand), so its state is Triton's READY; the reason says where it
  lives: "pinned" (held in a device slot), "resident" (in a slot, evictable) or "registered"
  (on disk or in the host cache). A version the engine could not take (it no longer validates
  against the served model) is UNAVAILABLE.
- RepositoryModelLoad pins: the adapter named (its latest version, or `name@version`), or an
  endpoint's adapters. RepositoryModelUnload unpins the same way; it never deletes anything
  (the Admin API's DeleteAdapter does). Soft prompts and the base model are always resident,
  so loading or unloading them changes nothing.
"""
from __future__ import annotations

import asyncio

from loraplex.adapters_store.errors import StoreError
from loraplex.server.engine.adapter_errors import AdapterError, AdapterQuarantined
from loraplex.v1 import kserve_v2_pb2 as pb

from .generate_request import ApiError, store_error
from .model_names import Model, find_model
from .registry_sync import retry_unservable
from .server_state import ServerState

UNLOAD_PARAMETERS = {"unload_dependents"}  # tritonclient always sends it; nothing depends on an adapter


async def index(state: ServerState, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
    _one_repository(request.repository_name)
    try:
        records = await asyncio.to_thread(state.store.list)
    except StoreError as exc:
        raise store_error(exc) from None
    where = await state.engine_loop.call(lambda e: {r.ref: e.residency(r.ref) for r in records})
    models = []
    for record in records:
        if where[record.ref] is None:
            entry = ("UNAVAILABLE", state.not_servable(record.ref))
        elif record.kind == "soft_prompt":
            entry = ("READY", "resident")  # soft prompts stay on the device once registered
        else:
            entry = ("READY", where[record.ref])
        if request.ready and entry[0] != "READY":
            continue
        models.append(pb.RepositoryIndexResponse.ModelIndex(name=record.name, version=str(record.version),
                                                             state=entry[0], reason=entry[1]))
    return pb.RepositoryIndexResponse(models=models)


async def load(state: ServerState, request: pb.RepositoryModelLoadRequest) -> None:
    _one_repository(request.repository_name)
    if request.parameters:
        raise ApiError("INVALID_ARGUMENT", f"loading takes no parameters (got {', '.join(sorted(request.parameters))}): "
                                           "it pins an adapter that is already registered; register new ones "
                                           "with the Admin API (RegisterAdapter, UploadAdapter)")
    for ref in await _loras(state, request.model_name):
        await _pin(state, ref)


async def unload(state: ServerState, request: pb.RepositoryModelUnloadRequest) -> None:
    _one_repository(request.repository_name)
    unknown = set(request.parameters) - UNLOAD_PARAMETERS
    if unknown:
        raise ApiError("INVALID_ARGUMENT", f"unknown unload parameter(s) {', '.join(sorted(unknown))}; "
                                           f"only {', '.join(sorted(UNLOAD_PARAMETERS))} is accepted")
    for ref in await _loras(state, request.model_name):
        await state.engine_loop.call(lambda e, ref=ref: e.unpin_adapter(ref))


def _one_repository(name: str) -> None:
    if name:
        raise ApiError("INVALID_ARGUMENT", f"there is one repository (the adapter registry); "
                                           f"leave repository_name empty, not {name!r}")


async def _loras(state: ServerState, name: str) -> list[str]:
    """The exact LoRA versions a load or unload of `name` acts on."""
    model: Model = await asyncio.to_thread(find_model, state.store, state.model_name, name)
    if model.kind == "lora":
        return [model.ref]
    if model.kind == "endpoint":
        try:
            ep = await asyncio.to_thread(state.store.get_endpoint, model.name)
        except StoreError as exc:
            raise store_error(exc) from None
        return [ref for ref in (ep.adapter, ep.canary_adapter) if ref]
    return []  # a soft prompt or the base model: always resident


async def _pin(state: ServerState, ref: str) -> None:
    if ref in state.unservable:  # its files may have been restored since start-up
        await retry_unservable(state, ref)

    def pin(engine) -> None:
        if engine.adapter_kind(ref) is None:
            raise ApiError("FAILED_PRECONDITION", f"{ref} is {state.not_servable(ref)}")
        engine.pin_adapter(ref)

    try:
        await state.engine_loop.call(pin)
    except AdapterQuarantined as exc:
        raise ApiError(exc.status, str(exc)) from None
    except AdapterError as exc:  # every slot is pinned or in use
        raise ApiError("RESOURCE_EXHAUSTED", str(exc)) from None
