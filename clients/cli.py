"""The `loraplex` command. Subcommands are imported lazily so light ones never import torch."""
import importlib
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
    "bench": ("loraplex.bench.suite", "Run the benchmark suite against the peers (JSON, markdown, plots)."),
}


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
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, function or "main")(rest)


if __name__ == "__main__":
    sys.exit(main())
