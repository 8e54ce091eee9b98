"""The `loraplex.v1.Admin` gRPC service: adapters and endpoints at run time, without a restart.

The registry (`adapters_store`) is the source of truth; the engine knows every registered
version under its exact name "name@version". Registering validates against the served base
model before anything becomes visible: the header and config, and the values (finite, and not
absurd for the base: see `adapter_values.py`), read on the engine's adapter-reader thread so no
other thread starts torch work of its own.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf import json_format

from loraplex.adapters_store.errors import StoreError
from loraplex.adapters_store.names import parse_ref, validate_file_name, validate_name
from loraplex.adapters_store.records import AdapterRecord, EndpointRecord
from loraplex.server.engine.adapter_errors import AdapterError, AdapterQuarantined
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.peft_config import read_adapter_config
from loraplex.v1 import admin_pb2 as pb
from loraplex.v1 import admin_pb2_grpc
from loraplex.v1 import inference_pb2

from .generate_request import ApiError, store_error
from .server_state import ServerState
from .status import abort

KINDS = {"lora": pb.ADAPTER_KIND_LORA, "soft_prompt": pb.ADAPTER_KIND_SOFT_PROMPT}
TEMPLATE_FILE = "loraplex_template.txt"  # written by `loraplex train`: the prompt template it trained with
MAX_UPLOAD_FILES = 16


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, state: ServerState, max_adapter_bytes: int = 4 << 30) -> None:
        self.state = state
        self.max_adapter_bytes = max_adapter_bytes

    # helpers ----------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        return self.state.engine_loop.engine

    def validator(self, shown: str, name: str):
        """The store's validation callback: the engine's checks, against the served model. The store
        validates its own staging copy; messages name what the operator sent (`shown`) instead."""

        def validate(directory: Path) -> dict:
            try:
                return self._summary(directory, name)
            except AdapterError as exc:
                raise AdapterError(str(exc).replace(str(directory), shown)) from None

        return validate

    def _summary(self, directory: Path, name: str) -> dict:
        engine = self.engine
        summary = engine.inspect_adapter(directory)
        engine.check_adapter_values(directory, name).result()  # raises AdapterError
        summary["base_model"] = read_adapter_config(directory).get("base_model_name_or_path") or ""
        template = directory / TEMPLATE_FILE
        if template.is_file():
            summary["template"] = template.read_text(encoding="utf-8")
        return summary

    async def _guard(self, context: grpc.aio.ServicerContext, fn, *args):
        """Run blocking registry work off the event loop; map failures to status codes."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StoreError as exc:
            err = store_error(exc)
        except AdapterError as exc:
            err = ApiError("INVALID_ARGUMENT", str(exc))
        except ApiError as exc:
            err = exc
        await abort(context, err.code, err.message)

    async def _info(self, record: AdapterRecord) -> pb.AdapterInfo:
        where = await self.state.engine_loop.call(lambda e: e.residency(record.ref))
        resident, pinned = where in ("pinned", "resident"), where == "pinned"
        meta = record.metadata
        return pb.AdapterInfo(
            name=record.name, version=record.version, kind=KINDS[record.kind], digest=record.digest,
            size_bytes=record.size_bytes, ranks=meta.get("ranks", {}),
            num_virtual_tokens=meta.get("num_virtual_tokens", 0), base_model=meta.get("base_model", "") or "",
            created_at=record.created_at, resident=resident, pinned=pinned,
            warnings=meta.get("warnings", []), template=meta.get("template", ""),
        )

    async def _publish(self, context, fn, *args) -> pb.AdapterInfo:
        record = await self._guard(context, fn, *args)
        local = await asyncio.to_thread(self.state.store.local_dir, record)
        # its values were checked by the validator, before the registry stored it
        await self.state.engine_loop.call(lambda e: e.register_adapter(record.ref, str(local), values_checked=True))
        self.state.metrics.registered.inc()
        return await self._info(record)

    # adapters ---------------------------------------------------------------------------
    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.AdapterInfo:
        path = Path(request.path)
        if not request.path or not path.is_dir():
            await abort(context, "INVALID_ARGUMENT", f"no directory {request.path!r} on the server")
        return await self._publish(context, self.state.store.publish_dir, request.name, path,
                                   self.validator(request.path, request.name))

    async def UploadAdapter(self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context) -> pb.AdapterInfo:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "name":
            await abort(context, "INVALID_ARGUMENT", "the first upload message must carry the name")
        name = first.name
        try:
            validate_name(name)
        except StoreError as exc:
            await abort(context, "INVALID_ARGUMENT", str(exc))
        with self.state.store.staging() as staged:
            files: dict[str, object] = {}
            total = 0
            try:
                async for msg in request_iterator:
                    if msg.WhichOneof("part") != "chunk":
                        raise ApiError("INVALID_ARGUMENT", "only file chunks may follow the name")
                    fname = msg.chunk.path
                    try:
                        validate_file_name(fname)
                    except StoreError as exc:
                        raise store_error(exc) from None
                    total += len(msg.chunk.data)
                    if total > self.max_adapter_bytes:
                        raise ApiError("RESOURCE_EXHAUSTED", f"upload larger than {self.max_adapter_bytes} bytes")
                    if fname not in files:
                        if len(files) >= MAX_UPLOAD_FILES:
                            raise ApiError("INVALID_ARGUMENT", f"more than {MAX_UPLOAD_FILES} files")
                        files[fname] = open(staged / fname, "wb")
                    files[fname].write(msg.chunk.data)
            except ApiError as exc:
                await abort(context, exc.code, exc.message)
            finally:
                for f in files.values():
                    f.close()
            return await self._publish(context, self.state.store.publish, name, staged,
                                       self.validator(f"upload {name!r}", name))

    async def GetAdapter(self, request: pb.AdapterRef, context) -> pb.AdapterInfo:
        return await self._info(await self._guard(context, self.state.store.get, request.name))

    async def ListAdapters(self, request, context) -> pb.ListAdaptersResponse:
        records = await self._guard(context, self.state.store.list)
        return pb.ListAdaptersResponse(adapters=[await self._info(r) for r in records])

    async def DeleteAdapter(self, request: pb.AdapterRef, context) -> pb.DeleteAdapterResponse:
        infos = [await self._info(r) for r in await self._guard(context, self._existing, request.name)]
        deleted = await self._guard(context, self.state.store.delete, request.name)
        for record in deleted:
            await self.state.engine_loop.call(lambda e, ref=record.ref: e.unregister_adapter(ref, missing_ok=True))
            self.state.metrics.registered.dec()
        return pb.DeleteAdapterResponse(deleted=infos)

    def _existing(self, ref: str) -> list[AdapterRecord]:
        name, version = parse_ref(ref)
        return [self.state.store.get(ref)] if version is not None else self.state.store.versions(name)

    async def PinAdapter(self, request: pb.AdapterRef, context) -> pb.AdapterInfo:
        record = await self._guard(context, self.state.store.get, request.name)
        if record.kind != "lora":
            await abort(context, "INVALID_ARGUMENT", f"{record.ref} is a soft prompt: always resident")
        try:
            await self.state.engine_loop.call(lambda e: e.pin_adapter(record.ref))
        except AdapterQuarantined as exc:
            await abort(context, "FAILED_PRECONDITION", str(exc))
        except AdapterError as exc:
            await abort(context, "RESOURCE_EXHAUSTED", str(exc))
        return await self._info(record)

    async def UnpinAdapter(self, request: pb.AdapterRef, context) -> pb.AdapterInfo:
        record = await self._guard(context, self.state.store.get, request.name)
        await self.state.engine_loop.call(lambda e: e.unpin_adapter(record.ref))
        return await self._info(record)

    # endpoints --------------------------------------------------------------------------
    async def CreateEndpoint(self, request: pb.Endpoint, context) -> pb.Endpoint:
        return endpoint_to_proto(await self._guard(context, self.state.store.create_endpoint, endpoint_from_proto(request)))

    async def UpdateEndpoint(self, request: pb.Endpoint, context) -> pb.Endpoint:
        return endpoint_to_proto(await self._guard(context, self.state.store.update_endpoint, endpoint_from_proto(request)))

    async def GetEndpoint(self, request: pb.EndpointRef, context) -> pb.Endpoint:
        return endpoint_to_proto(await self._guard(context, self.state.store.get_endpoint, request.name))

    async def ListEndpoints(self, request, context) -> pb.ListEndpointsResponse:
        return pb.ListEndpointsResponse(
            endpoints=[endpoint_to_proto(e) for e in await self._guard(context, self.state.store.list_endpoints)])

    async def DeleteEndpoint(self, request: pb.EndpointRef, context) -> pb.Empty:
        await self._guard(context, self.state.store.delete_endpoint, request.name)
        return pb.Empty()

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        engine = self.engine
        cfg = engine.config
        resident = await self.state.engine_loop.call(lambda e: e.stats().resident_adapters)
        return pb.ServerInfo(
            model=self.state.model_name, dtype=cfg.dtype, quantize=cfg.quantize, kernels=engine.ops.__name__.split(".")[-1],
            max_model_len=engine.max_model_len, max_lora_rank=cfg.max_lora_rank, max_loras=cfg.max_loras,
            max_running=cfg.max_running, max_queue=self.state.engine_loop.max_queue,
            max_new_tokens=self.state.defaults.max_new_tokens_limit, resident_adapters=sorted(resident),
            version=_version(),
        )


def endpoint_from_proto(msg: pb.Endpoint) -> EndpointRecord:
    defaults = json_format.MessageToDict(msg.defaults, preserving_proto_field_name=True)
    if "seed" in defaults:
        defaults["seed"] = int(defaults["seed"])
    return EndpointRecord(
        name=msg.name, adapter=msg.adapter or None, soft_prompt=msg.soft_prompt or None, template=msg.template,
        system_message=msg.system_message, defaults=defaults,
        max_new_tokens_cap=msg.max_new_tokens_cap if msg.HasField("max_new_tokens_cap") else None,
        canary_adapter=msg.canary.adapter or None, canary_weight=msg.canary.weight,
    )


def endpoint_to_proto(rec: EndpointRecord) -> pb.Endpoint:
    defaults = inference_pb2.SamplingParameters()
    json_format.ParseDict({k: v for k, v in rec.defaults.items() if v is not None}, defaults)
    msg = pb.Endpoint(
        name=rec.name, adapter=rec.adapter or "", soft_prompt=rec.soft_prompt or "", template=rec.template,
        system_message=rec.system_message, defaults=defaults, created_at=rec.created_at, updated_at=rec.updated_at,
    )
    if rec.max_new_tokens_cap is not None:
        msg.max_new_tokens_cap = rec.max_new_tokens_cap
    if rec.canary_adapter:
        msg.canary.adapter = rec.canary_adapter
        msg.canary.weight = rec.canary_weight
    return msg


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loraplex")
    except PackageNotFoundError:
        return os.environ.get("LORAPLEX_VERSION", "dev")
