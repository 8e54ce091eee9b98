"""What a model name means in loraplex, for the fronts that name one thing (OpenAI's `model`,
KServe v2's model name and version).

A name resolves as DESIGN.md's "Words" say for a single name: an endpoint first, then an
adapter (`name`, `name@version`, or `name` plus KServe's `model_version`), and last the base
model under the name the server reports (`--model` as given, or the default model's path),
which generates with no adapter. Endpoints and the base model have no versions.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex.adapters_store.errors import StoreError
from loraplex.adapters_store.store import AdapterStore

from .generate_request import ApiError, store_error


@dataclass(frozen=True)
class Model:
    name: str  # as the client named it
    kind: str  # "endpoint" | "lora" | "soft_prompt" | "base"
    ref: str = ""  # the exact "name@version" of an adapter
    versions: tuple[str, ...] = ()  # every registered version of an adapter
    version: str = ""  # the version served ("" for endpoints and the base model)


def find_model(store: AdapterStore, base_name: str, name: str, version: str = "") -> Model:
    """Resolve a model name (blocking: it reads the registry). Raises ApiError NOT_FOUND or
    INVALID_ARGUMENT with the reason."""
    if not name:
        raise ApiError("INVALID_ARGUMENT", "the model name is empty")
    if version and not (version.isdigit() and version[0] != "0"):
        raise ApiError("INVALID_ARGUMENT", f"model version {version!r} is not a positive integer")
    if "@" not in name and _is_endpoint(store, name):
        _unversioned(name, version, "an endpoint")
        return Model(name, "endpoint")
    adapter = _adapter(store, name, version)
    if adapter is not None:
        return adapter
    if name == base_name:
        _unversioned(name, version, "the base model")
        return Model(name, "base")
    raise ApiError("NOT_FOUND", f"no endpoint, adapter or base model named {name!r}")


def _is_endpoint(store: AdapterStore, name: str) -> bool:
    try:
        store.get_endpoint(name)
    except StoreError as exc:
        if exc.code in ("not_found", "invalid"):
            return False
        raise store_error(exc) from None
    return True


def _adapter(store: AdapterStore, name: str, version: str) -> Model | None:
    if version and "@" in name:
        raise ApiError("INVALID_ARGUMENT", f"model {name!r} names a version already; leave model_version empty")
    ref = f"{name}@{version}" if version else name
    try:
        record = store.get(ref)
        versions = store.versions(record.name)
    except StoreError as exc:
        if exc.code == "not_found" and ("@" in ref) and _has_versions(store, ref.partition("@")[0]):
            raise store_error(exc) from None  # the adapter exists, that version does not
        if exc.code in ("not_found", "invalid"):
            return None
        raise store_error(exc) from None
    return Model(name, record.kind, record.ref, tuple(str(r.version) for r in versions), str(record.version))


def _has_versions(store: AdapterStore, name: str) -> bool:
    try:
        return bool(store.versions(name))
    except StoreError:
        return False


def _unversioned(name: str, version: str, what: str) -> None:
    if version:
        raise ApiError("INVALID_ARGUMENT", f"{name!r} is {what} and has no versions; leave model_version empty")
