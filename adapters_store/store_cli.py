"""`loraplex store`: look after an adapter store's durability, beside or instead of the server.

    loraplex store verify  [--store S] [--blobs B]      compare rows, blobs and manifests; change nothing
    loraplex store rebuild [--store S] [--blobs B] [--adopt-unnamed]
                                                        re-create the registry's rows from the manifests
    loraplex store backup DIR [--store S]               a consistent online copy of a store directory

`--store`, `--blobs` and `--blob-cache` mean what they mean to `loraplex serve` (and
default to the same). Exit status: 0 done (verify: consistent); 1 verify found the store
inconsistent, or rebuild left a manifest unrestored; 2 refused (bad arguments, a store that
cannot be opened, a store directory another process has open during rebuild). It imports
neither torch nor grpc.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .backup import backup
from .errors import StoreError
from .postgres_metadata import is_postgres_url
from .rebuild import ADOPTED_PREFIX, RebuildReport, rebuild
from .store import AdapterStore
from .verify import verify


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("verify", "report rows without blobs, blobs without rows, manifest mismatches"),
                            ("rebuild", "re-create the registry's rows from the blobs' manifests"),
                            ("backup", "copy a store directory (database, blobs, manifests) while it serves")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--store", default=os.environ.get("LORAPLEX_STORE",
                                                           str(Path.home() / ".local/share/loraplex/store")))
        sub.add_argument("--blobs", default=os.environ.get("LORAPLEX_BLOBS"))
        sub.add_argument("--blob-cache", default=str(Path.home() / ".cache/loraplex/blobs"))
    commands.choices["rebuild"].add_argument(
        "--adopt-unnamed", action="store_true",
        help=f"register each blob no manifest names as {ADOPTED_PREFIX}<first 12 hex digits of its digest>")
    commands.choices["backup"].add_argument("dest", type=Path, help="a new or empty directory")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run = {"verify": _verify, "rebuild": _rebuild, "backup": _backup}[args.command]
    try:
        return run(args)
    except (StoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.store, args.blobs, Path(args.blob_cache))
    print("\n".join(report.lines()))
    return 0 if report.consistent else 1


def _rebuild(args: argparse.Namespace) -> int:
    store = AdapterStore(args.store, blobs=args.blobs, cache=Path(args.blob_cache), guard=False)
    try:
        if store.root is not None and not store.exclusive:
            raise StoreError("failed_precondition", f"adapter store {store.root} is open in another process (a "
                                                    "running `loraplex serve`?); stop it, then run rebuild again")
        report = rebuild(store, args.adopt_unnamed)
        where = store.where
    finally:
        store.close()
    print("\n".join(_rebuild_lines(where, report)))
    return 1 if report.not_restored or report.unreadable else 0


def _rebuild_lines(where: str, report: RebuildReport) -> list[str]:
    out = [f"adapter store {where}: restored {len(report.restored)} version(s) from their manifests"
           + (f": {', '.join(report.restored)}" if report.restored else ""),
           f"{report.already} version(s) already had a row"]
    for title, items in (("not restored", report.not_restored), ("unreadable manifests", report.unreadable),
                         ("adopted", report.adopted)):
        if items:
            out.append(f"{title}: {len(items)}")
            out.extend(f"  {item}" for item in items)
    if report.unnamed:
        out.append(f"blobs no manifest names, kept: {len(report.unnamed)} (their names were lost with the database; "
                   f"--adopt-unnamed registers each as {ADOPTED_PREFIX}<digest prefix>)")
        out.extend(f"  {digest}" for digest in report.unnamed)
    out.append(f"endpoints are not recorded beside the blobs and were not restored (the database holds "
               f"{report.endpoints}); re-create them, or restore a `loraplex store backup`")
    return out


def _backup(args: argparse.Namespace) -> int:
    if is_postgres_url(args.store):
        raise ValueError("loraplex store backup copies a store directory; for --store postgresql://... run "
                         "pg_dump, then copy --blobs (see docs/SCALE_OUT.md, 'Backing up the registry')")
    report = backup(Path(args.store), args.dest)
    print(f"backed up adapter store {args.store} to {report.dest}: {report.versions} version(s), "
          f"{report.endpoints} endpoint(s), {report.blobs} blob(s); serve it with --store {report.dest}")
    return 0
