"""`loraplex generate`: run requests through the engine without a server.

All requests of one input file run through the engine together, as one mixed workload.
With --json, one line per request in input order: {"text", "token_ids", "finish_reason"} or
{"error"} for a request that failed alone. Exit status 0 when every request completed, 1 when
some failed (their lines say why), 2 for unusable arguments or input.
"""
from __future__ import annotations

import argparse
import json
import sys

from .cli_args import add_engine_args, engine_config, name_and_path

REQUEST_FIELDS = {"prompt", "messages", "adapter", "soft_prompt", "max_new_tokens", "temperature", "top_p",
                  "top_k", "seed", "stop", "ignore_eos"}
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action="append", type=name_and_path, default=[], metavar="NAME=DIR",
                   help="register a PEFT adapter (LoRA or soft prompt: the kind comes from its config)")
    p.add_argument("--soft-prompt", action="append", type=name_and_path, default=[], metavar="NAME=DIR",
                   help="register a PEFT prompt-tuning adapter")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="JSONL file of requests ('-' for stdin)")
    src.add_argument("--prompt", help="a single prompt")
    p.add_argument("--adapter-name", help="with --prompt: the LoRA adapter to apply")
    p.add_argument("--soft-prompt-name", help="with --prompt: the soft prompt to apply")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default for requests that do not say")
    p.add_argument("--temperature", type=float, default=0.0, help="default for requests that do not say (0: greedy)")
    p.add_argument("--json", action="store_true", help="one JSON line per request")
    add_engine_args(p)
    return p


def parse_line(raw: str, lineno: int, defaults: dict):
    """One JSONL line -> Request; raises ValueError naming the line and the problem."""
    from .sampler import SamplingParams
    from .sequence import Request

    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - REQUEST_FIELDS)
    if unknown:
        raise ValueError(f"line {lineno}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(REQUEST_FIELDS))}")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f"line {lineno}: give exactly one of 'prompt' or 'messages'")
    for key in ("adapter", "soft_prompt"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise ValueError(f"line {lineno}: '{key}' must be a string")
    sampling = {k: obj.get(k, defaults.get(k)) for k in SAMPLING_FIELDS if obj.get(k, defaults.get(k)) is not None}
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = (sampling["stop"],)
    try:
        params = SamplingParams(**sampling)
        params.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"line {lineno}: {exc}") from None
    return Request(prompt=obj.get("prompt"), messages=obj.get("messages"), adapter=obj.get("adapter"),
                   soft_prompt=obj.get("soft_prompt"), params=params, request_id=f"line-{lineno}")


def read_requests(args: argparse.Namespace) -> list:
    """-> list of Request or, for a line that cannot be a request, its error message."""
    from .sampler import SamplingParams
    from .sequence import Request

    defaults = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.prompt is not None:
        params = SamplingParams(**defaults)
        return [Request(prompt=args.prompt, adapter=args.adapter_name, soft_prompt=args.soft_prompt_name,
                        params=params)]
    stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with stream:
        lines = [(i, line) for i, line in enumerate(stream, 1) if line.strip()]
    out: list = []
    for lineno, line in lines:
        try:
            out.append(parse_line(line, lineno, defaults))
        except ValueError as exc:
            out.append(str(exc))
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt is None and (args.adapter_name or args.soft_prompt_name):
        print("error: --adapter-name/--soft-prompt-name go with --prompt; put them in the input lines", file=sys.stderr)
        return 2
    names = [name for name, _ in args.adapter + args.soft_prompt]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        print(f"error: adapter name(s) given more than once: {', '.join(duplicates)}", file=sys.stderr)
        return 2
    try:
        items = read_requests(args)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read --input: {exc}", file=sys.stderr)
        return 2
    if not items:
        print("error: no requests in the input", file=sys.stderr)
        return 2

    from .adapter_errors import AdapterError
    from .engine import Engine
    from .peft_config import report_base_model

    try:
        engine = Engine(engine_config(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"loraplex: {engine.model_path.name}, {engine.config.dtype}, quantize {engine.config.quantize}, "
          f"kernels {engine.ops.__name__.rsplit('.', 1)[-1]}", file=sys.stderr)
    refused: dict[str, str] = {}
    for name, path in args.adapter + args.soft_prompt:
        try:
            entry = engine.register_adapter(name, path)
            report_base_model(name, path, entry.summary.get("warnings", []))
            if (name, path) in args.soft_prompt and entry.kind != "soft_prompt":
                engine.unregister_adapter(name)
                raise AdapterError(f"{path} is a {entry.kind} adapter, not a soft prompt")
        except AdapterError as exc:
            refused[name] = str(exc)
            print(f"error: adapter {name!r} refused: {exc}", file=sys.stderr)

    if args.merge:
        if args.merge in refused or engine.slots.kind(args.merge) != "lora":
            print(f"error: --merge {args.merge}: not a LoRA adapter given with --adapter", file=sys.stderr)
            return 2
        engine.merge_adapter(args.merge, static=True)
    requests = [r for r in items if not isinstance(r, str)]
    completions = iter(engine.generate(requests))
    failed = 0
    for item in items:
        if isinstance(item, str):
            result = {"error": item}
        else:
            c = next(completions)
            for name in (item.adapter, item.soft_prompt):
                if c.error and name in refused:
                    c.error = f"adapter {name!r} was refused at startup: {refused[name]}"
            if c.error and item.request_id and item.request_id.startswith("line-"):
                c.error = f"line {item.request_id[5:]}: {c.error}"
            result = {"error": c.error} if c.error else {
                "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
        failed += "error" in result
        if args.json:
            print(json.dumps(result, ensure_ascii=False), flush=True)
        elif "error" in result:
            print(f"[error] {result['error']}", flush=True)
        else:
            print(result["text"], flush=True)
    return 1 if failed else 0
