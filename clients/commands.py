"""The client subcommands of `loraplex`: `complete`, `adapters` and `endpoints`.

Each `*_main(argv)` returns the exit status: 0 on success, 1 when the server refused or failed
the call (its message on stderr), 2 for unusable arguments. Admin subcommands print JSON.
Like client.py, this module imports only grpcio and protobuf.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import cast

from .client import Client, Completion, LoraplexError, StreamEvent
from .options import GenerateOptions

DEFAULT_SERVER = "127.0.0.1:50051"
# GenerateOptions' sampling options that are flags here: those an endpoint's defaults take too
# (n and the logprobs options shape a response that `complete` does not print).
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


class UsageError(Exception):
    """An argument that parsed but cannot be used (an unreadable file, a bad directory)."""


# --- shared plumbing ------------------------------------------------------------------------

def _add_connection_args(parser: argparse.ArgumentParser, *, admin: bool) -> None:
    default = os.environ.get("LORAPLEX_SERVER") or DEFAULT_SERVER
    group = parser.add_argument_group("connection")
    group.add_argument("--server", default=default, metavar="HOST:PORT",
                       help=f"the server (default: $LORAPLEX_SERVER, else {DEFAULT_SERVER})")
    if admin:
        group.add_argument("--admin-token-file", metavar="FILE", help="file holding the admin token")
    else:
        group.add_argument("--api-key-file", metavar="FILE", help="file holding the API key")
    group.add_argument("--tls-ca", metavar="FILE", help="CA certificates (PEM) to verify the server with; enables TLS")
    group.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    group.add_argument("--tls-key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    group.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline of each call")


def _add_sampling_args(parser: argparse._ActionsContainer) -> None:
    parser.add_argument("--max-new-tokens", type=int, metavar="N")
    parser.add_argument("--temperature", type=float, metavar="T", help="0: greedy")
    parser.add_argument("--top-p", type=float, metavar="P")
    parser.add_argument("--top-k", type=int, metavar="K")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", metavar="TEXT", help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_const", const=True, help="generate past the end token")


def _sampling(args: argparse.Namespace) -> GenerateOptions:
    """The sampling flags that were given; the rest stay unset (server or endpoint defaults)."""
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    return cast(GenerateOptions, given)  # tests/clients/test_options.py: SAMPLING_FLAGS are options


def _read_secret(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {flag} {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if not secret:
        raise UsageError(f"{flag} {path!r} is empty")
    return secret


def _client(args: argparse.Namespace, *, admin: bool) -> Client:
    api_key = None if admin or not args.api_key_file else _read_secret(args.api_key_file, "--api-key-file")
    token = _read_secret(args.admin_token_file, "--admin-token-file") if admin and args.admin_token_file else None
    try:
        return Client(args.server, api_key=api_key, admin_token=token, tls_ca=args.tls_ca,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, timeout=args.timeout)
    except OSError as exc:
        raise UsageError(f"cannot read TLS file {exc.filename!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _run(parser: argparse.ArgumentParser, argv: list[str],
         action: Callable[[argparse.Namespace], None]) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (2) or the help (0)
        return 0 if exc.code is None else int(exc.code)
    try:
        action(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except LoraplexError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# --- complete -------------------------------------------------------------------------------

def complete_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex complete", description="Send one prompt to a loraplex server.")
    task = p.add_mutually_exclusive_group()
    task.add_argument("--endpoint", metavar="E", help="the task endpoint to call")
    task.add_argument("--adapter", metavar="A[@V]", help="a LoRA adapter to apply directly")
    p.add_argument("--soft-prompt", metavar="S[@V]", help="a soft prompt to apply directly")
    _add_sampling_args(p)
    p.add_argument("--stream", action="store_true", help="print the text as it arrives")
    p.add_argument("--json", action="store_true",
                   help='print {"text", "token_ids", "finish_reason", "adapter", "request_id"}')
    p.add_argument("prompt", metavar="PROMPT", help="the prompt ('-' reads it from stdin)")
    _add_connection_args(p, admin=False)
    return p


def _collect(events: Iterable[StreamEvent], echo: bool) -> Completion:
    """Assemble a stream into a Completion, writing each delta to stdout when `echo`."""
    text, token_ids, end = [], [], None
    for event in events:
        if event.is_final:
            end = event
            break
        text.append(event.text)
        token_ids.extend(event.token_ids)
        if echo:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if echo:
        sys.stdout.write("\n")
    if end is None:
        raise LoraplexError("UNKNOWN", "the server ended the stream without its final event")
    return Completion(
        text="".join(text), token_ids=token_ids, finish_reason=end.finish_reason or "",
        prompt_tokens=end.prompt_tokens or 0, completion_tokens=end.completion_tokens or 0,
        request_id=end.request_id, endpoint=end.served_by.endpoint, adapter=end.served_by.adapter,
        soft_prompt=end.served_by.soft_prompt,
    )


def _complete(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options: GenerateOptions = {"endpoint": args.endpoint, "adapter": args.adapter, "soft_prompt": args.soft_prompt,
                                **_sampling(args)}
    with _client(args, admin=False) as client:
        if args.stream:
            result = _collect(client.stream(prompt, **options), echo=not args.json)
        else:
            result = client.generate(prompt, **options)
            if not args.json:
                print(result.text)
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "adapter": result.adapter, "request_id": result.request_id}))


def complete_main(argv: list[str]) -> int:
    return _run(complete_parser(), argv, _complete)


# --- adapters -------------------------------------------------------------------------------

def adapters_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_args(common, admin=True)
    p = argparse.ArgumentParser(prog="loraplex adapters", description="Manage the server's adapters.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = sub.add_parser("register", parents=[common], help="upload a local adapter directory and register it")
    register.add_argument("name", metavar="NAME")
    register.add_argument("dir", metavar="DIR", help="a flat PEFT adapter directory")
    register.add_argument("--server-path", action="store_true",
                          help="DIR is a path on the server's filesystem (inside one of its --adapter-root "
                               "directories): register it there, upload nothing")
    register.add_argument("--idempotency-key", metavar="KEY",
                          help="run again with the same KEY and get the version the first run registered, not a "
                               "new one (default: a fresh key; the command itself retries with it while the "
                               "server is unavailable)")
    sub.add_parser("list", parents=[common], help="list every adapter version")
    for action, text in (("show", "show one adapter (the latest version of NAME, or NAME@VERSION)"),
                         ("delete", "delete NAME@VERSION, or every version of NAME"),
                         ("pin", "keep an adapter on the device"), ("unpin", "let an adapter be evicted")):
        sub.add_parser(action, parents=[common], help=text).add_argument("ref", metavar="NAME[@VERSION]")
    return p


def _register(client: Client, args: argparse.Namespace) -> dict:
    if args.server_path:
        return client.register_adapter(args.name, args.dir, idempotency_key=args.idempotency_key)
    try:
        return client.upload_adapter(args.name, args.dir, idempotency_key=args.idempotency_key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _adapters(args: argparse.Namespace) -> None:
    actions = {
        "register": lambda c: _register(c, args),
        "list": lambda c: c.list_adapters(),
        "show": lambda c: c.get_adapter(args.ref),
        "delete": lambda c: c.delete_adapter(args.ref),
        "pin": lambda c: c.pin(args.ref),
        "unpin": lambda c: c.unpin(args.ref),
    }
    with _client(args, admin=True) as client:
        _print_json(actions[args.action](client))


def adapters_main(argv: list[str]) -> int:
    return _run(adapters_parser(), argv, _adapters)


# --- endpoints ------------------------------------------------------------------------------

def _canary(text: str) -> tuple[str, float]:
    adapter, sep, weight = text.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        value = -1.0
    if not sep or not adapter or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected ADAPTER@VERSION:WEIGHT with WEIGHT in 0..1, got {text!r}")
    return adapter, value


def endpoints_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_args(common, admin=True)
    p = argparse.ArgumentParser(prog="loraplex endpoints", description="Manage the server's task endpoints.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("create", "define a new endpoint"),
                         ("update", "change an endpoint; what is not given stays as it is")):
        e = sub.add_parser(action, parents=[common], help=text)
        e.add_argument("name", metavar="NAME")
        e.add_argument("--adapter", metavar="A[@V]", help="LoRA adapter (a bare name resolves to its latest version)")
        e.add_argument("--soft-prompt", metavar="S[@V]", help="soft prompt (likewise)")
        e.add_argument("--template", metavar="T", help="text with one {input} slot")
        e.add_argument("--system-message", metavar="TEXT", help="system turn put in front of chat requests")
        e.add_argument("--max-new-tokens-cap", type=int, metavar="N", help="upper bound on any request's max_new_tokens")
        e.add_argument("--canary", type=_canary, metavar="A@V:WEIGHT",
                       help="send this fraction (0..1) of requests to another adapter version")
        if action == "update":
            e.add_argument("--no-canary", action="store_true", help="remove the canary split")
        defaults = e.add_argument_group("sampling defaults", "used when a request does not say")
        _add_sampling_args(defaults)
    sub.add_parser("list", parents=[common], help="list every endpoint")
    for action, text in (("show", "show one endpoint"), ("delete", "delete an endpoint")):
        sub.add_parser(action, parents=[common], help=text).add_argument("name", metavar="NAME")
    return p


def _endpoint_fields(args: argparse.Namespace, current: dict) -> dict:
    """The endpoint's definition: the flags given, over `current` (empty when creating)."""
    def pick(flag: str) -> str:
        value = getattr(args, flag)
        return current.get(flag, "") if value is None else value

    canary = args.canary
    if canary is None and not getattr(args, "no_canary", False) and current.get("canary"):
        canary = (current["canary"].get("adapter", ""), current["canary"].get("weight", 0.0))
    cap = current.get("max_new_tokens_cap") if args.max_new_tokens_cap is None else args.max_new_tokens_cap
    return dict(adapter=pick("adapter"), soft_prompt=pick("soft_prompt"), template=pick("template"),
                system_message=pick("system_message"), defaults={**current.get("defaults", {}), **_sampling(args)},
                max_new_tokens_cap=cap, canary=canary)


def _endpoints(args: argparse.Namespace) -> None:
    with _client(args, admin=True) as client:
        if args.action == "create":
            result = client.create_endpoint(args.name, **_endpoint_fields(args, {}))
        elif args.action == "update":
            # UpdateEndpoint takes the whole definition, so start from the stored one.
            current = client.get_endpoint(args.name)
            result = client.update_endpoint(args.name, **_endpoint_fields(args, current))
        elif args.action == "list":
            result = client.list_endpoints()
        elif args.action == "show":
            result = client.get_endpoint(args.name)
        else:
            client.delete_endpoint(args.name)
            result = {"deleted": args.name}
        _print_json(result)


def endpoints_main(argv: list[str]) -> int:
    return _run(endpoints_parser(), argv, _endpoints)
