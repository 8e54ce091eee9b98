"""An adapter trained on another base model (whose shapes fit) is served, and the server says so
in one log line per adapter version, at start-up, however often the adapter is loaded again."""
from __future__ import annotations

import json
import shutil

from loraplex.clients.client import Client


def test_other_base_model_is_one_log_line_per_version(server_factory, tiny_model, tiny_adapters, tmp_path, api):
    other = shutil.copytree(tiny_adapters["attn4"], tmp_path / "sql-lora")
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M"
    (other / "adapter_config.json").write_text(json.dumps(config))

    first = server_factory()
    with Client(first.target, timeout=60) as client:
        client.upload_adapter("sql", other)
        client.upload_adapter("plain", tiny_adapters["mlp8"])
    assert first.terminate() == 0

    # one slot and one host copy: every request below loads its adapter again, from disk
    server = server_factory("--max-loras", "1", "--max-cpu-loras", "1", store=first.store)
    line = f"adapter sql@1 was trained on SmolLM2-360M; serving {tiny_model.name}"
    assert line in server.output()  # said while starting, before any request
    with Client(server.target, timeout=60) as client:
        for adapter in ["sql", "plain"] * 3:
            assert client.generate("hello world", adapter=adapter, max_new_tokens=2).adapter == f"{adapter}@1"
    assert api.metric(api.scrape(server), "loraplex_adapter_loads_total") == 6
    log = server.output()
    [said] = [text for text in log.splitlines() if "trained on" in text]
    assert said.endswith(f"WARNING loraplex.adapters: {line}"), log
    assert "UserWarning" not in log
