"""`loraplex train --register` against a real `loraplex serve` process: the adapter is uploaded, the
endpoint serves the new version with the training template, and served prompts equal training prompts."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from loraplex.clients.client import Client
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request
from loraplex.trainer.data import load_jsonl
from loraplex.trainer.prompts import PromptFormat
from loraplex.trainer.templates import load_template

READY = re.compile(r"loraplex serving .* on [\d.]+:(?P<port>\d+) ")
TOKEN = "s3cret-admin"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("register-server")
    (root / "token").write_text(TOKEN)
    log = root / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraplex.clients.cli", "serve", "--model", str(tiny_model), "--store",
             str(root / "store"), "--port", "0", "--metrics-port", "0", "--block-size", "4", "--max-total-tokens",
             "4096", "--threads", "1", "--admin-token-file", str(root / "token")],
            stdout=out, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while not (match := READY.search(log.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        yield f"127.0.0.1:{match['port']}", root / "token"
    finally:
        proc.kill()
        proc.wait()


def _train(run_train, tiny_model, task_file, out, target, token_file, seed: str) -> int:
    return run_train("--model", tiny_model, "--data", task_file, "--method", "lora", "--max-steps", "8", "--lr", "1e-2",
                     "--seed", seed, "--no-eval", "--out", out, "--register", target, "--endpoint", "reverse",
                     "--admin-token-file", token_file)


def test_register_points_the_endpoint_at_each_new_version(server, tiny_model, task_file, run_train, tmp_path, capsys):
    target, token_file = server
    assert _train(run_train, tiny_model, task_file, tmp_path / "v1", target, token_file, "1") == 0
    template = (tmp_path / "v1" / "loraplex_template.txt").read_text()
    with Client(target, admin_token=TOKEN, timeout=60) as client:
        endpoint = client.get_endpoint("reverse")
        assert endpoint["adapter"] == "reverse@1" and endpoint["template"] == template
        assert client.get_adapter("reverse@1")["template"] == template
        # the served prompt is the training prompt: the endpoint (chat turn + template) gives the
        # same tokens as the engine fed the prompt built exactly as in training
        row = load_jsonl(task_file)[0]
        served = client.generate(messages=[{"role": "user", "content": row.input}], endpoint="reverse",
                                 max_new_tokens=6, temperature=0.0, ignore_eos=True)
        client.update_endpoint("reverse", **{**_fields(endpoint), "defaults": {"max_new_tokens": 7}})

    engine = Engine(EngineConfig(model=str(tiny_model), max_total_tokens=512, block_size=4))
    engine.register_adapter("v1", str(tmp_path / "v1"))
    fmt = PromptFormat(load_template("flan"), chat=True)
    ids = fmt.prompt_ids(engine.tokenizer, row)
    local = engine.generate([Request(prompt_token_ids=ids, adapter="v1",
                                     params=SamplingParams(max_new_tokens=6, ignore_eos=True))])[0]
    assert served.token_ids == local.token_ids and served.prompt_tokens == len(ids)

    assert _train(run_train, tiny_model, task_file, tmp_path / "v2", target, token_file, "2") == 0
    with Client(target, admin_token=TOKEN, timeout=60) as client:
        endpoint = client.get_endpoint("reverse")
        assert endpoint["adapter"] == "reverse@2" and endpoint["template"] == template
        assert endpoint["defaults"]["max_new_tokens"] == 7  # the endpoint's own settings are kept
        names = {a["name"] + "@" + str(a["version"]) for a in client.list_adapters()}
    assert {"reverse@1", "reverse@2"} <= names


def _fields(endpoint: dict) -> dict:
    return {k: endpoint.get(k) for k in ("adapter", "soft_prompt", "template", "system_message")}


def test_refused_registration_fails_with_the_servers_reason(server, tiny_model, task_file, run_train, tmp_path, capsys):
    target, _ = server
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    assert _train(run_train, tiny_model, task_file, tmp_path / "x", target, wrong, "3") == 1
    err = capsys.readouterr().err
    assert "registering failed: UNAUTHENTICATED" in err or "registering failed: PERMISSION_DENIED" in err
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()  # the trained adapter stays on disk
    empty = tmp_path / "empty-token"
    empty.write_text("")
    assert _train(run_train, tiny_model, task_file, tmp_path / "y", target, empty, "3") == 2
    assert "is empty" in capsys.readouterr().err
