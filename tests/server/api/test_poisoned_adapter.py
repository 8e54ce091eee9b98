"""One adapter must never hurt another tenant, through a real `loraplex serve` and real gRPC
clients (DESIGN.md, Isolation).

- A server refuses, at registration, adapters whose lora_B is NaN, inf or 1e30, whose lora_alpha
  is 1e308, or a soft prompt of NaN vectors (INVALID_ARGUMENT saying why); nothing is registered.
- A server whose value check was switched off (a `sitecustomize` on its PYTHONPATH replaces
  it: the poisoned adapter gets past validation, as the engine must survive anyway) serves
  one: the request on it fails alone with INTERNAL saying why, the requests beside it and the
  ones after it get the tokens they get on a clean server, and the adapter is refused with
  FAILED_PRECONDITION until registered again. The server's KV cache is small (24 blocks of 4),
  so the requests after it reuse the poisoned request's blocks.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.clients.client import Client, LoraplexError

VALUES = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}
PROBES = [dict(prompt="the quick brown fox"), dict(prompt="hello world", adapter="good"),
          dict(prompt="SELECT name FROM users", adapter="neighbour"), dict(prompt="good morning", soft_prompt="soft")]
NEW = 15
SMALL_CACHE = ("--max-total-tokens", "96", "--max-loras", "6")
SKIP_VALUE_CHECK = '''"""Test-only (tests/server/api/test_poisoned_adapter.py): this server never checks adapter values,
so a poisoned adapter gets past validation."""
from loraplex.server.engine import adapter_slots

adapter_slots.check_values = lambda *args, **kwargs: None
'''


def _rewrite(src: Path, out: Path, change) -> Path:
    shutil.copytree(src, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: change(k, t) for k, t in tensors.items()}, str(weights), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_adapters) -> dict[str, Path]:
    """attn4 with every lora_B entry NaN, inf or 1e30; attn4 with lora_alpha 1e308; soft of NaNs."""
    root = tmp_path_factory.mktemp("poisoned")
    out = {k: _rewrite(tiny_adapters["attn4"], root / k,
                       lambda key, t, v=v: torch.full_like(t, v) if ".lora_B." in key else t)
           for k, v in VALUES.items()}
    out["soft-nan"] = _rewrite(tiny_adapters["soft"], root / "soft-nan",
                               lambda key, t: torch.full_like(t, float("nan")))
    alpha = shutil.copytree(tiny_adapters["attn4"], root / "alpha")
    config = json.loads((alpha / "adapter_config.json").read_text())
    (alpha / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308}))
    out["alpha"] = alpha
    return out


def _tenants(client: Client, tiny_adapters) -> None:
    client.upload_adapter("good", tiny_adapters["mlp8"])
    client.upload_adapter("neighbour", tiny_adapters["attn4"])  # the poisoned adapters' shape and rank class
    client.upload_adapter("soft", tiny_adapters["soft"])


def _probe(target: str, probe: dict) -> list[int]:
    with Client(target, timeout=120) as client:
        return client.generate(max_new_tokens=NEW, ignore_eos=True, **probe).token_ids


def _refused(target: str, **request) -> LoraplexError:
    with Client(target, timeout=120) as client, pytest.raises(LoraplexError) as info:
        client.generate(max_new_tokens=NEW, ignore_eos=True, **request)
    return info.value


@pytest.fixture(scope="module")
def unchecked_server(module_server_factory, tiny_adapters, poisoned, tmp_path_factory):
    """(server, each probe's tokens alone before anything was poisoned)."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SKIP_VALUE_CHECK)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(site))
        server = module_server_factory(*SMALL_CACHE, name="unchecked")
    with Client(server.target, timeout=60) as client:
        _tenants(client, tiny_adapters)
        for name in VALUES:
            client.upload_adapter(f"x-{name}", poisoned[name])  # gets past validation: nothing checks
    return server, [_probe(server.target, p) for p in PROBES]


@pytest.mark.parametrize("value", list(VALUES))
def test_a_poisoned_adapter_fails_alone(value, unchecked_server):
    server, alone = unchecked_server
    poisoned = dict(prompt="translate to French: good morning", adapter=f"x-{value}")
    with ThreadPoolExecutor(len(PROBES) + 1) as pool:
        beside = [pool.submit(_probe, server.target, p) for p in PROBES]
        failed = pool.submit(_refused, server.target, **poisoned)
        beside = [f.result() for f in beside]
        failed = failed.result()
    assert failed.code == "INTERNAL", failed
    assert "non-finite" in failed.message and f"'x-{value}@1'" in failed.message, failed.message
    assert beside == alone  # beside it in the batch: the same tokens as alone (wide margins, see DESIGN.md)

    again = _refused(server.target, **poisoned)
    assert again.code == "FAILED_PRECONDITION" and "quarantined" in again.message, again
    after = [_probe(server.target, p) for p in PROBES]  # reusing its KV blocks: the same batch shape as before
    assert after == alone
    assert server.proc.poll() is None


def test_registering_again_lifts_the_quarantine(unchecked_server, tiny_adapters):
    """A fixed adapter registered under the name is its next version: served, where the poisoned
    version stays refused."""
    server, _ = unchecked_server
    with Client(server.target, timeout=60) as client:
        client.upload_adapter("x-fixed", tiny_adapters["mlp8"])
        served = client.generate("hello world", adapter="x-fixed", max_new_tokens=4, ignore_eos=True)
    assert served.adapter == "x-fixed@1" and len(served.token_ids) == 4


@pytest.fixture(scope="module")
def checking_server(module_server_factory, tiny_adapters):
    server = module_server_factory(*SMALL_CACHE, name="checking")
    with Client(server.target, timeout=60) as client:
        _tenants(client, tiny_adapters)
    return server


@pytest.mark.parametrize("poison, why", [("nan", "NaN or infinite"), ("inf", "NaN or infinite"),
                                         ("huge", "Frobenius norm"), ("alpha", "NaN or infinite"),
                                         ("soft-nan", "NaN or infinite")])
@pytest.mark.parametrize("how", ["upload", "register"])
def test_registration_refuses_poisoned_values(poison, why, how, checking_server, poisoned):
    with Client(checking_server.target, timeout=60) as client:
        before = client.list_adapters()
        with pytest.raises(LoraplexError) as info:
            if how == "upload":
                client.upload_adapter("bad", poisoned[poison])
            else:
                client.register_adapter("bad", str(poisoned[poison]))
        assert info.value.code == "INVALID_ARGUMENT", info.value
        assert why in info.value.message, info.value.message
        assert client.list_adapters() == before
        assert client.generate("hello world", adapter="good", max_new_tokens=4, ignore_eos=True).token_ids
