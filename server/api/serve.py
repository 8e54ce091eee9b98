"""`loraplex serve`: the gRPC server (Inference, Admin, KServe v2, health, reflection) and /metrics.

On start it loads the base model, re-registers every adapter in the store, starts the engine
thread, then serves. On SIGTERM (or SIGINT) health turns NOT_SERVING, new requests are refused
with UNAVAILABLE, running ones finish within --shutdown-grace seconds, and the process exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("loraplex.serve")


def build_parser() -> argparse.ArgumentParser:
    from loraplex.server.engine.cli_args import add_engine_args

    p = argparse.ArgumentParser(prog="loraplex serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=50051, help="gRPC port (0: pick a free one, printed at start)")
    g.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port (0: pick one)")
    g.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API on this port (default off; 0: pick one)")
    g.add_argument("--http-header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds an HTTP connection gets to send a request's line and headers, counted from "
                        "the connection (TLS handshake included) or the request's first byte; late ones get 408 "
                        "and are closed (default 10; bodies and streamed responses are not timed)")
    g.add_argument("--http-idle-timeout", type=float, default=75.0, metavar="SECONDS",
                   help="seconds an idle keep-alive HTTP connection stays open between requests (default 75: "
                        "longer than the 60 s of common proxies and load balancers, so they close first)")
    g.add_argument("--store", default=os.environ.get("LORAPLEX_STORE", str(Path.home() / ".local/share/loraplex/store")),
                   help="registry: a directory (SQLite metadata and content-addressed blobs), or "
                        "postgresql://user:password@host/db shared by several replicas (with --blobs)")
    g.add_argument("--blobs", default=os.environ.get("LORAPLEX_BLOBS"),
                   help="with a postgresql:// store: where adapter files live, a directory every replica "
                        "mounts or a bucket URL (s3://bucket/prefix; credentials from the usual environment)")
    g.add_argument("--blob-cache", default=str(Path.home() / ".cache/loraplex/blobs"),
                   help="local copies of adapters fetched from a --blobs bucket")
    g.add_argument("--registry-poll-seconds", type=float, default=2.0,
                   help="how often to pick up adapters other replicas registered or deleted (0: never)")
    g.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which calls get RESOURCE_EXHAUSTED")
    g.add_argument("--admin-token-file", help="require this token (authorization: Bearer ...) on the Admin API")
    g.add_argument("--api-key-file", help="require this key (authorization: Bearer ...) on the Inference API")
    g.add_argument("--tls-cert", help="serve TLS with this certificate chain (PEM)")
    g.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    g.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    g.add_argument("--default-max-new-tokens", type=int, default=256, help="when neither request nor endpoint says")
    g.add_argument("--max-new-tokens-limit", type=int, default=4096, help="the most any request may ask for")
    g.add_argument("--max-message-bytes", type=int, default=4 << 20, help="largest gRPC message accepted")
    g.add_argument("--max-adapter-bytes", type=int, default=4 << 30, help="largest adapter accepted")
    g.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="a directory whose adapter directories the Admin API may register by server path "
                        "(repeatable); without one, adapters register by upload only")
    g.add_argument("--max-endpoint-labels", type=int, default=100, help="distinct endpoint label values in metrics")
    g.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds running requests get after SIGTERM")
    g.add_argument("--log-level", default="INFO")
    add_engine_args(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    for root in args.adapter_root:
        if not os.path.isdir(root):
            print(f"error: --adapter-root {root}: no such directory", file=sys.stderr)
            return 2
    from .auth import read_token_file

    try:
        api_key = read_token_file(args.api_key_file)
        admin_token = read_token_file(args.admin_token_file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(args, api_key, admin_token))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


class Wired(NamedTuple):
    health: Any  # grpc_health's aio HealthServicer
    health_names: tuple[str, ...]  # the services health reports SERVING ("" is the whole server)
    banner: str  # the line printed once everything listens


class StartupError(Exception):
    """A start-up failure the user can fix (a bad flag, a busy port, a refused store): printed as
    one `error:` line, exit 2, after everything started so far has been torn down."""


async def _serve(args: argparse.Namespace, api_key: str | None, admin_token: str | None) -> int:
    """Build, wire, run; every step registers its teardown on one exit stack, so a failure at any
    point (or the end of a clean shutdown) undoes exactly what was started, in reverse order."""
    async with contextlib.AsyncExitStack() as stack:
        state = await _build(args, stack)
        wired = await _wire(args, state, api_key, admin_token, stack)
        await _run(args, state, wired)
    return 0


async def _build(args: argparse.Namespace, stack: contextlib.AsyncExitStack):
    """The store, the engine (on its own thread) with the stored adapters restored, and the ServerState."""
    from loraplex.adapters_store.errors import StoreError
    from loraplex.adapters_store.store import AdapterStore
    from loraplex.server.engine.adapter_errors import AdapterError
    from loraplex.server.engine.cli_args import engine_config
    from loraplex.server.engine.engine import Engine

    from .engine_loop import EngineLoop, EngineThread
    from .generate_request import ServerDefaults
    from .metrics import Metrics
    from .metrics_hook import MetricsHook
    from .registry_sync import restore_adapters
    from .server_state import ServerState

    try:  # the store first: one that must not be opened (see adapters_store/guard.py) refuses in seconds
        store = AdapterStore(args.store, max_adapter_bytes=args.max_adapter_bytes, blobs=args.blobs,
                             cache=Path(args.blob_cache))
    except (ValueError, FileNotFoundError, OSError, StoreError) as exc:
        raise StartupError(exc) from None
    stack.callback(store.close)
    engine_thread = EngineThread()
    try:
        engine = await engine_thread.run(Engine, engine_config(args))
    except (ValueError, FileNotFoundError, OSError, StoreError) as exc:
        raise StartupError(exc) from None
    refused = await engine_thread.run(restore_adapters, engine, store)
    if args.merge:
        try:
            ref = store.get(args.merge).ref
            await engine_thread.run(lambda: engine.merge_adapter(ref, static=True))
        except (StoreError, AdapterError) as exc:  # a usage error at start-up
            raise StartupError(f"--merge {args.merge}: {exc}") from None
    # Start-up leaves ~360,000 long-lived objects (torch, transformers, grpc); a full collection
    # walks them all in ~180 ms, stopping whichever thread triggered it, the engine's included.
    # Frozen, they are never walked again, and later collections see only newer objects.
    gc.collect()
    gc.freeze()
    metrics = Metrics(args.max_endpoint_labels)
    metrics.registered.set(len(store.list()))
    hook = MetricsHook(metrics)
    engine_loop = EngineLoop(engine, args.max_queue, on_step=hook.step, on_change=hook.gauges, thread=engine_thread)
    return ServerState(engine_loop, store, metrics, ServerDefaults(args.default_max_new_tokens, args.max_new_tokens_limit),
                       model_name=str(args.model or engine.model_path), unservable=refused)


async def _wire(args: argparse.Namespace, state, api_key: str | None, admin_token: str | None,
                stack: contextlib.AsyncExitStack) -> Wired:
    """The gRPC services, the ports (gRPC, metrics, optional HTTP), the engine loop and the registry
    poller, all started."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
    from loraplex.v1 import kserve_v2_pb2, kserve_v2_pb2_grpc

    from .admin_service import AdminService
    from .auth import AuthInterceptor
    from .inference_service import InferenceService
    from .kserve_service import KServeService
    from .registry_sync import RegistrySync
    from .wire_errors import UndecodableRequests

    options = [("grpc.max_receive_message_length", args.max_message_bytes),
               ("grpc.max_send_message_length", args.max_message_bytes)]
    # auth first: an unauthenticated call is refused as such, whatever bytes it sent
    server = grpc.aio.server(interceptors=[AuthInterceptor(api_key, admin_token), UndecodableRequests()],
                             options=options)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(state), server)
    kserve_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeService(state), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(state, args.max_adapter_bytes, args.adapter_root), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    named = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
             admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name)
    reflection.enable_server_reflection(named + (health.SERVICE_NAME, reflection.SERVICE_NAME, kserve_v2_pb2.DESCRIPTOR
                                        .services_by_name["GRPCInferenceService"].full_name), server)
    address = f"{args.host}:{args.port}"
    try:
        port = server.add_secure_port(address, _tls(args)) if args.tls_cert else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address} for gRPC: {exc}") from None
    try:
        metrics_port = state.metrics.serve(args.host, args.metrics_port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {args.host}:{args.metrics_port} for metrics: {exc}") from None
    state.engine_loop.start()
    stack.callback(state.engine_loop.stop)
    await server.start()
    stack.push_async_callback(server.stop, 1.0)
    http_note = await _start_http(args, state, api_key, stack) if args.http_port is not None else ""
    if args.registry_poll_seconds > 0:
        poller = asyncio.create_task(RegistrySync(state, args.registry_poll_seconds).run())
        stack.callback(poller.cancel)
    banner = (f"loraplex serving {state.model_name} on {args.host}:{port} (metrics on {args.host}:{metrics_port})"
              f"{http_note}")
    return Wired(health_servicer, ("",) + named, banner)


async def _start_http(args: argparse.Namespace, state, api_key: str | None, stack: contextlib.AsyncExitStack) -> str:
    from . import openai_http

    tls = openai_http.tls_context(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    try:
        timeouts = openai_http.HttpTimeouts(args.http_header_timeout, args.http_idle_timeout)
    except ValueError as exc:
        raise StartupError(exc) from None
    try:
        runner, port = await openai_http.start(openai_http.build_app(state, api_key, args.max_message_bytes),
                                               args.host, args.http_port, tls, timeouts)
    except OSError as exc:
        raise StartupError(f"cannot listen on {args.host}:{args.http_port} for HTTP: {exc}") from None
    stack.push_async_callback(runner.cleanup)
    return f" (OpenAI HTTP on {args.host}:{port})"


async def _run(args: argparse.Namespace, state, wired: Wired) -> None:
    """Serve until SIGTERM or SIGINT, then drain: health turns NOT_SERVING, new requests are refused,
    running ones get --shutdown-grace seconds. The exit stack stops the rest."""
    from grpc_health.v1 import health_pb2

    for service in wired.health_names:
        await wired.health.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(wired.banner, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down: refusing new requests, finishing %d running", state.engine_loop.num_live())
    state.draining = True
    await wired.health.enter_graceful_shutdown()
    deadline = loop.time() + args.shutdown_grace
    while state.engine_loop.num_live() and loop.time() < deadline:
        await asyncio.sleep(0.05)


def _tls(args: argparse.Namespace):
    import grpc

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    client_ca = read(args.tls_client_ca) if args.tls_client_ca else None
    return grpc.ssl_server_credentials([(read(args.tls_key), read(args.tls_cert))], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)
