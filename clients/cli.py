"""The `loraplex` command. Subcommands are imported lazily so light ones never import torch."""
import importlib
import sys

SUBCOMMANDS = {
    "generate": ("loraplex.server.engine.offline", "Run requests through the engine offline."),
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
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
