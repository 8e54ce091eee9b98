"""The `loraplex` command. Subcommands are imported lazily so light ones never import torch.

The base install is only the client; the engine, the trainer and the benchmarks come with extras
(pyproject.toml), which `scripts/install.sh EXTRA` installs. A subcommand whose extra is missing
ends in one line on stderr naming what is missing and that command, with exit status 2, rather
than in a ModuleNotFoundError traceback from deep inside an import (or, for accelerate, a
ValueError from transformers halfway through a run): the extra's modules are looked up, not
imported, before the subcommand starts, and a ModuleNotFoundError naming one of them later is
reported the same way. A missing module outside the extra (a bug in loraplex) still raises.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> ("module" or "module:function", help); the function (default `main`) takes the
# remaining arguments and returns the exit status.
SUBCOMMANDS = {
    "serve": ("loraplex.server.api.serve", "Serve the model over gRPC (Inference, Admin) with /metrics."),
    "generate": ("loraplex.server.engine.offline", "Run requests through the engine offline."),
    "merge": ("loraplex.server.engine.export", "Export a Hugging Face model with a LoRA adapter merged in."),
    "train": ("loraplex.trainer.train", "Train a LoRA, QLoRA, soft prompt or full fine-tune (PEFT format)."),
    "eval": ("loraplex.trainer.evaluate", "Score base and tuned model side by side (ROUGE, BLEU, exact match)."),
    "complete": ("loraplex.clients.commands:complete_main", "Send one prompt to a loraplex server."),
    "adapters": ("loraplex.clients.commands:adapters_main", "Register, list, show and delete a server's adapters."),
    "endpoints": ("loraplex.clients.commands:endpoints_main", "Create, update, list and delete a server's endpoints."),
    "store": ("loraplex.adapters_store.store_cli", "Verify, rebuild from its blobs, or back up an adapter store."),
    "bench": ("loraplex.bench.suite", "Run the benchmark suite against the peers (JSON, markdown, plots)."),
}

# Each extra's distributions (as pyproject.toml names them) -> the top-level module each installs.
# tests/clients/test_missing_extra.py checks these against pyproject.toml.
_SERVE = {
    "torch": "torch", "numpy": "numpy", "transformers": "transformers", "tokenizers": "tokenizers",
    "safetensors": "safetensors", "gguf": "gguf", "sentencepiece": "sentencepiece", "jinja2": "jinja2",
    "bitsandbytes": "bitsandbytes", "prometheus-client": "prometheus_client",
    "grpcio-health-checking": "grpc_health", "grpcio-reflection": "grpc_reflection", "aiohttp": "aiohttp",
    "regex": "regex", "accelerate": "accelerate",
}
EXTRAS: dict[str, dict[str, str]] = {
    "serve": _SERVE,
    "train": {**_SERVE, "peft": "peft", "rouge-score": "rouge_score", "sacrebleu": "sacrebleu"},
    "bench": {**_SERVE, "peft": "peft", "matplotlib": "matplotlib"},
}
# subcommand -> the extra it needs; a subcommand not named here runs on the base (client) install.
NEEDS = {"serve": "serve", "generate": "serve", "merge": "serve", "train": "train", "eval": "train", "bench": "bench"}


def missing_distributions(extra: str) -> list[str]:
    """The distributions of `extra` whose module cannot be found (looked up, not imported)."""
    return [dist for dist, module in EXTRAS[extra].items() if importlib.util.find_spec(module) is None]


def _missing_dependency(exc: ModuleNotFoundError, extra: str | None) -> str | None:
    """The distribution of `extra` whose absence `exc` reports; None when it is anything else."""
    if extra is None:
        return None
    return next((dist for dist, module in EXTRAS[extra].items() if exc.name == module), None)


def _report_missing(name: str, extra: str, missing: list[str]) -> int:
    verb = "is" if len(missing) == 1 else "are"
    print(f"loraplex {name}: {', '.join(missing)} {verb} not installed (the {extra} extra); "
          f"install it with: scripts/install.sh {extra}", file=sys.stderr)
    return 2


def build_parser(name: str) -> argparse.ArgumentParser:
    """Subcommand `name`'s argument parser, built without running the subcommand: its module's
    `build_parser()`, or `X_parser()` beside an `X_main` entry point."""
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, function.removesuffix("_main") + "_parser" if function else "build_parser")()


def _run(name: str, rest: list[str]) -> int:
    extra = NEEDS.get(name)
    missing = missing_distributions(extra) if extra else []
    if missing:
        return _report_missing(name, extra, missing)
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, function or "main")(rest)
    except ModuleNotFoundError as exc:
        dist = _missing_dependency(exc, extra)
        if dist is None:
            raise
        return _report_missing(name, extra, [dist])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: loraplex <command> [options]\n\ncommands:")
        for name, (_, help_text) in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"loraplex: unknown command {name!r}; try 'loraplex --help'", file=sys.stderr)
        return 2
    return _run(name, rest)


if __name__ == "__main__":
    sys.exit(main())
