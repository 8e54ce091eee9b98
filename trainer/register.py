"""`loraplex train --register`: upload the new adapter to a running server and point an endpoint at it.

Only the files the server needs are uploaded (the adapter, its config, the training template,
the training arguments and the evaluation report); checkpoints and data splits stay local. The
endpoint is created, or updated in place, so that it serves the new version with the training
template as its template: serving prompts are then built as the training prompts were. The
endpoint's other settings (sampling defaults, system message, cap, canary) are kept.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from loraplex.clients.client import Client, LoraplexError

TEMPLATE_FILE = "loraplex_template.txt"  # read by the server's Admin service as the adapter's template
UPLOADED = ("adapter_config.json", "adapter_model.safetensors", TEMPLATE_FILE, "training_args.json",
            "eval.json", "eval.md")


def read_secret(path: str | None) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --admin-token-file {path!r}: {exc}") from None
    if not token:
        raise ValueError(f"--admin-token-file {path!r} is empty")
    return token


def register(target: str, adapter_dir: Path, name: str, endpoint: str, kind: str, *,
             admin_token: str | None = None, tls_ca: str | None = None, timeout: float = 120) -> dict:
    """Upload `adapter_dir` as a new version of `name` and point `endpoint` at it.

    Returns {"adapter": info, "endpoint": endpoint}. Raises LoraplexError when the server refuses.
    """
    template_file = adapter_dir / TEMPLATE_FILE
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else ""
    field = "adapter" if kind == "lora" else "soft_prompt"
    with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as staging, \
            Client(target, admin_token=admin_token, tls_ca=tls_ca, timeout=timeout) as client:
        for fname in UPLOADED:
            if (adapter_dir / fname).is_file():
                shutil.copyfile(adapter_dir / fname, Path(staging) / fname)
        info = client.upload_adapter(name, staging)
        ref = f"{info['name']}@{info['version']}"
        try:
            current = client.get_endpoint(endpoint)
        except LoraplexError as exc:
            if exc.code != "NOT_FOUND":
                raise
            current = None
        if current is None:
            result = client.create_endpoint(endpoint, template=template, **{field: ref})
        else:
            fields = dict(adapter=current.get("adapter") or None, soft_prompt=current.get("soft_prompt") or None,
                          template=template or current.get("template", ""),
                          system_message=current.get("system_message", ""), defaults=current.get("defaults") or None,
                          max_new_tokens_cap=current.get("max_new_tokens_cap"))
            canary = current.get("canary") or {}
            if canary.get("adapter"):
                fields["canary"] = (canary["adapter"], canary.get("weight", 0.0))
            fields[field] = ref
            result = client.update_endpoint(endpoint, **fields)
    return {"adapter": info, "endpoint": result}
