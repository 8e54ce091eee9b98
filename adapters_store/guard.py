"""Refuse to open a store whose database does not hold its registry while its blobs exist.

Why: start-up recovery used to treat every blob no row names as an orphan and delete it, so a
lost, emptied or mistyped database deleted every adapter file (``: > registry.sqlite3``, then
start: 8 blobs -> 0), and with shared ``--blobs`` one replica started against an empty database
would have deleted the files every replica serves. Removal is now licensed only by the journal
(:mod:`.journal`), and before a store is opened its database is checked against its blobs:

- a database file that is missing or empty (0 bytes), or a database (file or PostgreSQL)
  without the registry's tables or that has never registered an adapter, while blobs exist that
  no journal entry names: refused, with the recovery command (``loraplex store rebuild``);
- a database file that is not a SQLite database or cannot be read: always refused, blobs or
  not, since opening it would mean overwriting it.

The check comes before anything is created or changed: the file checks before SQLite is asked
to open the file, the registry check inside the first write transaction, before any migration
(inside it, so a first publish racing the check is never mistaken for an empty registry). The
blobs are listed before the database is looked at, so a blob that appears meanwhile belongs to
a registry the check then finds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import StoreError


@dataclass(frozen=True)
class RegistryState:
    """What a database holds, read before anything is created in it."""

    has_tables: bool
    registrations: int  # names ever registered: adapter_names keeps them after every version is deleted
    journaled: frozenset[str]  # blobs an interrupted operation names


@dataclass(frozen=True)
class Guard:
    store: str  # the store, as messages name it
    blobs_where: str  # where its blobs are
    present: frozenset[str]  # the blobs there, listed before the database was opened
    rebuild: str  # the command that re-creates the registry from the blobs

    def check_file(self, database: str, problem: str, unreadable: bool) -> None:
        """A database file that is missing or empty may be created unless blobs are at risk; an
        unreadable one is never opened."""
        if unreadable:
            raise StoreError("failed_precondition", f"{self.store}: {database} {problem}; nothing was changed. "
                             "Restore it from a backup, or move it aside (keep it for diagnosis) and re-create "
                             f"the registry from the blobs' manifests with `{self.rebuild}`")
        self._refuse_if_at_risk(database, problem, frozenset())

    def check_registry(self, database: str, state: RegistryState) -> None:
        if not state.has_tables:
            self._refuse_if_at_risk(database, "holds no registry tables", state.journaled)
        elif state.registrations == 0:
            self._refuse_if_at_risk(database, "has never registered an adapter", state.journaled)

    def _refuse_if_at_risk(self, database: str, problem: str, journaled: frozenset[str]) -> None:
        at_risk = self.present - journaled
        if not at_risk:
            return
        raise StoreError(
            "failed_precondition",
            f"{self.store}: {database} {problem} but {self.blobs_where} holds {len(at_risk)} adapter blob(s); "
            "nothing was changed. If the database was lost, re-create the registry from the blobs' manifests "
            f"with `{self.rebuild}` or restore a backup; if --store names the wrong database, correct it",
        )
