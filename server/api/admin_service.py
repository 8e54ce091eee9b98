"""The `loraplex.v1.Admin` gRPC service: adapters and endpoints at run time, without a restart.

The registry (`adapters_store`) is the source of truth; the engine knows every registered
version under its exact name "name@version". Registering validates against the served base
model before anything becomes visible: the header and config, and the values (finite, and not
absurd for the base: see `adapter_values.py`), read on the engine's adapter-reader thread so no
other thread starts torch work of its own.

Registering by server path reads only inside the directories `--adapter-root` names (none by
default: then only uploads register). A path outside them is refused with PERMISSION_DENIED and
nothing about it (whether it exists, what it holds) is said, since the caller may be probing the
server's filesystem. Every response stays far below the message limit: each row's metadata is
bounded (`adapters_store/limits.py`) and listings come in pages of at most MAX_PAGE_BYTES.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import json
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from loraplex.adapters_store.endpoints import MAX_TEXT_CHARS
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
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
MAX_PAGE_BYTES = 1 << 20  # a listing page is cut here whatever its page_size (the message limit is 4 MiB)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, state: ServerState, max_adapter_bytes: int = 4 << 30,
                 adapter_roots: Sequence[str | os.PathLike] = ()) -> None:
        self.state = state
        self.max_adapter_bytes = max_adapter_bytes
        self.adapter_roots = tuple(Path(os.path.realpath(r)) for r in adapter_roots)

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
            summary["template"] = _read_template(template)
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
        except OSError as exc:
            err = os_error(exc)
        await abort(context, err.code, err.message)

    async def _info(self, record: AdapterRecord) -> pb.AdapterInfo:
        return (await self._infos([record]))[0]

    async def _infos(self, records: list[AdapterRecord]) -> list[pb.AdapterInfo]:
        """Each record's AdapterInfo, with residency read from the engine in one call between steps."""
        refs = [r.ref for r in records]
        where = await self.state.engine_loop.call(lambda e: [e.residency(ref) for ref in refs])
        return [_adapter_info(record, place) for record, place in zip(records, where)]

    async def _publish(self, context, fn, *args) -> pb.AdapterInfo:
        record = await self._guard(context, fn, *args)
        local = await asyncio.to_thread(self.state.store.local_dir, record)

        def register(engine: Engine) -> bool:
            """Its values were checked by the validator, before the registry stored it. A retry that
            its idempotency key answered with an earlier version finds that one registered already."""
            if engine.adapter_kind(record.ref) is not None:
                return False
            engine.register_adapter(record.ref, str(local), values_checked=True)
            return True

        if await self.state.engine_loop.call(register):
            self.state.metrics.registered.inc()
        return await self._info(record)

    def _server_path(self, given: str) -> Path:
        """The real path of a directory a RegisterAdapter names, if it lies inside an adapter root."""
        if not self.adapter_roots:
            raise ApiError("FAILED_PRECONDITION", "this server registers adapters by upload only (UploadAdapter, "
                                                  "`loraplex adapters register NAME DIR`); to register directories "
                                                  "on the server, start it with --adapter-root DIR")
        if not given or not os.path.isabs(given) or "\0" in given:
            raise ApiError("INVALID_ARGUMENT", "path must be an absolute path on the server")
        real = Path(os.path.realpath(given))
        if not any(real == root or root in real.parents for root in self.adapter_roots):
            raise ApiError("PERMISSION_DENIED", "path is outside this server's adapter roots (--adapter-root); "
                                                "register a directory inside one of them, or upload the adapter")
        if not real.is_dir():
            raise ApiError("INVALID_ARGUMENT", "path names no directory on the server")
        return real

    # adapters ---------------------------------------------------------------------------
    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.AdapterInfo:
        try:
            path = self._server_path(request.path)
        except ApiError as exc:
            await abort(context, exc.code, exc.message)
        return await self._publish(context, self.state.store.publish_dir, request.name, path,
                                   self.validator(request.path, request.name), request.idempotency_key or None)

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
            try:
                await self._receive(request_iterator, staged)
            except ApiError as exc:
                await abort(context, exc.code, exc.message)
            return await self._publish(context, self.state.store.publish, name, staged,
                                       self.validator(f"upload {name!r}", name), first.idempotency_key or None)

    async def _receive(self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], staged: Path) -> None:
        """Write an upload's file chunks into `staged`; ApiError for anything refused (a full disk
        included: the staging directory is removed by the caller whatever happens)."""
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
        except OSError as exc:
            raise os_error(exc) from None
        finally:
            for f in files.values():
                try:
                    f.close()
                except OSError:  # a full disk fails the flush too; the staging copy is discarded anyway
                    pass

    async def GetAdapter(self, request: pb.AdapterRef, context) -> pb.AdapterInfo:
        return await self._info(await self._guard(context, self.state.store.get, request.name))

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        page = await self._guard(context, self._page, request, "a",
                                 lambda after, n: self.state.store.list_page(tuple(after) if after else None, n))
        records, after = page
        infos = await self._infos(records)
        kept, after = _fit(infos, [(r.name, r.version) for r in records], after)
        return pb.ListAdaptersResponse(adapters=kept, next_page_token=_token("a", after))

    async def DeleteAdapter(self, request: pb.AdapterRef, context) -> pb.DeleteAdapterResponse:
        infos = await self._infos(await self._guard(context, self._existing, request.name))
        for info in infos:  # a name may have many versions: the answer must fit whatever they carried
            info.template = ""
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

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context) -> pb.ListEndpointsResponse:
        records, after = await self._guard(context, self._page, request, "e", self.state.store.list_endpoints_page)
        kept, after = _fit([endpoint_to_proto(e) for e in records], [e.name for e in records], after)
        return pb.ListEndpointsResponse(endpoints=kept, next_page_token=_token("e", after))

    @staticmethod
    def _page(request, kind: str, fetch: Callable):
        """One page of a listing: `fetch(after, page_size)` from where the request's token points."""
        size = request.page_size or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise ApiError("INVALID_ARGUMENT", f"page_size {size} is over the limit of {MAX_PAGE_SIZE}")
        return fetch(_after(kind, request.page_token), size)

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


def _adapter_info(record: AdapterRecord, where: str | None) -> pb.AdapterInfo:
        resident, pinned = where in ("pinned", "resident"), where == "pinned"
        meta = record.metadata
        return pb.AdapterInfo(
            name=record.name, version=record.version, kind=KINDS[record.kind], digest=record.digest,
            size_bytes=record.size_bytes, ranks=meta.get("ranks", {}),
            num_virtual_tokens=meta.get("num_virtual_tokens", 0), base_model=meta.get("base_model", "") or "",
            created_at=record.created_at, resident=resident, pinned=pinned,
            warnings=meta.get("warnings", []), template=meta.get("template", ""),
        )


def _token(kind: str, after) -> str:
    """The opaque next_page_token for a listing that goes on after `after` ("" when it ends)."""
    if after is None:
        return ""
    return base64.urlsafe_b64encode(json.dumps([kind, after], separators=(",", ":")).encode()).decode()


def _after(kind: str, token: str):
    """Where a page_token says the listing goes on (None: from the start)."""
    if not token:
        return None
    try:
        found_kind, after = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        if found_kind == kind and (isinstance(after, str) if kind == "e" else
                                   isinstance(after, list) and len(after) == 2 and isinstance(after[0], str)
                                   and isinstance(after[1], int)):
            return after
    except (ValueError, TypeError, UnicodeEncodeError, binascii.Error):
        pass
    raise ApiError("INVALID_ARGUMENT", "page_token is not one this listing returned; pass a response's "
                                       "next_page_token unchanged, or none for the first page")


def _fit(messages: list, keys: list, after):
    """The leading messages whose serialized size stays within MAX_PAGE_BYTES (at least one), and
    where the next page then starts: a page is cut short rather than risk the message limit."""
    total = 0
    for i, msg in enumerate(messages):
        total += msg.ByteSize() + 8
        if total > MAX_PAGE_BYTES and i > 0:
            return messages[:i], keys[i - 1]
    return messages, after


def _read_template(path: Path) -> str:
    """The trainer's prompt template shipped beside an adapter, bounded like an endpoint's."""
    if path.stat().st_size > 4 * MAX_TEXT_CHARS:
        raise AdapterError(f"{TEMPLATE_FILE} is larger than {4 * MAX_TEXT_CHARS} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{TEMPLATE_FILE} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(text) > MAX_TEXT_CHARS:
        raise AdapterError(f"{TEMPLATE_FILE} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return text


def os_error(exc: OSError) -> ApiError:
    """A filesystem failure as the caller should see it: a full disk is RESOURCE_EXHAUSTED (nothing
    was registered; the staging copy is removed), anything else INTERNAL; never a server path."""
    if exc.errno in DISK_FULL:
        return ApiError("RESOURCE_EXHAUSTED", f"the server's adapter store is out of space ({exc.strerror}); "
                                              "nothing was registered")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ApiError("PERMISSION_DENIED", f"the server may not read the adapter's files ({exc.strerror})")
    return ApiError("INTERNAL", f"the server could not read or write adapter files: {exc.strerror or exc}")

