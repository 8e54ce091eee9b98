"""What OpenAI's `model` field names in loraplex, and the `/v1/models` list.

`model` resolves as DESIGN.md's "Words" say: an endpoint first, then an adapter (`name` for its
latest version or `name@version`; a soft prompt is applied as one), then the base model under
the name the server reports. Anything else is NOT_FOUND.
"""
from __future__ import annotations

from loraplex.adapters_store.store import AdapterStore

from .generate_request import ApiError
from .model_names import find_model
from .openai_schema import OpenAIError

OWNER = "loraplex"


def resolve_model(store: AdapterStore, base_name: str, model: str) -> dict[str, str]:
    """The GenerateCall fields that `model` stands for ({} for the base model). Blocking: it reads
    the registry."""
    try:
        found = find_model(store, base_name, model)
    except ApiError as exc:
        if exc.code != "NOT_FOUND":
            raise
        raise OpenAIError("NOT_FOUND", f"The model '{model}' does not exist: {exc.message} "
                                       "(GET /v1/models lists them)", "model") from None
    if found.kind == "endpoint":
        return {"endpoint": model}
    if found.kind == "base":
        return {}
    return {"adapter" if found.kind == "lora" else "soft_prompt": found.ref}


def list_models(store: AdapterStore, base_name: str, started: int) -> list[dict]:
    """The base model, every endpoint (parent: the adapter it serves, else the base) and every
    adapter by name (its latest version; parent: the base). An adapter whose name an endpoint
    shadows is listed as `name@version`."""
    models = [_model(base_name, started, "base", root=base_name, parent=None)]
    endpoints = store.list_endpoints()
    names = {ep.name for ep in endpoints}
    for ep in endpoints:
        models.append(_model(ep.name, int(ep.created_at), "endpoint", root=base_name,
                             parent=ep.adapter or ep.soft_prompt or base_name))
    latest = {}
    for record in store.list():  # by name, then version
        latest[record.name] = record
    for name, record in latest.items():
        shown = record.ref if name in names else name
        models.append(_model(shown, int(record.created_at), record.kind, root=base_name, parent=base_name,
                             version=record.version))
    return models


def _model(model_id: str, created: int, kind: str, **extra) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER, "kind": kind, **extra}
