"""`loraplex complete|adapters|endpoints` against the in-test fake server (tests/clients/conftest.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraplex.clients.cli import main

COMPLETE_KEYS = ["text", "token_ids", "finish_reason", "adapter", "request_id"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_complete_json(fake_server, capsys):
    code, out, err = run(capsys, "complete", "--server", fake_server.target, "--adapter", "sql",
                         "--temperature", "0", "--json", "hello")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert list(result) == COMPLETE_KEYS
    assert result == {"text": " you said hello", "token_ids": [ord(c) for c in " you said hello"],
                      "finish_reason": "stop", "adapter": "sql@1", "request_id": "req-1"}
    sampling = fake_server.inference.requests[-1].sampling
    assert sampling.HasField("temperature") and not sampling.HasField("max_new_tokens")


def test_complete_json_without_adapter_and_streamed(fake_server, capsys):
    code, out, _ = run(capsys, "complete", "--server", fake_server.target, "--json", "--stream", "hi")
    result = json.loads(out)
    assert code == 0 and list(result) == COMPLETE_KEYS
    assert result["adapter"] == "" and result["text"] == " you said hi" and result["finish_reason"] == "length"
    assert result["token_ids"] == [ord(c) for c in " you said hi"]


def test_complete_prints_text(fake_server, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_SERVER", fake_server.target)
    assert run(capsys, "complete", "hi there") == (0, " you said hi there\n", "")
    assert run(capsys, "complete", "--stream", "--endpoint", "sql-task", "hi") == (0, " you said hi\n", "")
    assert fake_server.inference.requests[-1].endpoint == "sql-task"


def test_complete_sends_api_key_from_file(fake_server, capsys, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("  k-42\n")
    code, _, _ = run(capsys, "complete", "--server", fake_server.target, "--api-key-file", str(key_file), "hi")
    assert code == 0 and fake_server.inference.metadata[-1]["authorization"] == "Bearer k-42"

    code, out, err = run(capsys, "complete", "--server", fake_server.target,
                         "--api-key-file", str(tmp_path / "absent"), "hi")
    assert code == 2 and out == "" and "--api-key-file" in err and "absent" in err


def test_complete_server_error_exits_1(fake_server, capsys):
    code, out, err = run(capsys, "complete", "--server", fake_server.target, "--endpoint", "missing", "hi")
    assert (code, out) == (1, "")
    assert err.strip() == "error: NOT_FOUND: unknown endpoint 'missing'"


@pytest.mark.parametrize("argv", [
    ["complete", "--endpoint", "a", "--adapter", "b", "hi"],
    ["complete"],
    ["complete", "--temperature", "warm", "hi"],
    ["endpoints", "create", "e", "--canary", "sql@2"],
    ["endpoints", "create", "e", "--canary", "sql@2:1.5"],
    ["adapters", "frobnicate"],
    ["nonsense"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_adapters_register_uploads(fake_server, adapter_dir, capsys, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("adm-1\n")
    code, out, _ = run(capsys, "adapters", "register", "sql", str(adapter_dir.path), "--server", fake_server.target,
                       "--admin-token-file", str(token_file))
    assert code == 0 and json.loads(out)["name"] == "sql"
    assert fake_server.admin.metadata[-1]["x-admin-token"] == "adm-1"
    received: dict[str, bytes] = {}
    for m in fake_server.admin.uploads[-1][1:]:
        received[m.chunk.path] = received.get(m.chunk.path, b"") + m.chunk.data
    assert received == adapter_dir.files


def test_adapters_register_server_path_and_refusals(fake_server, adapter_dir, capsys):
    code, out, _ = run(capsys, "adapters", "register", "sql", "/srv/sql", "--server-path", "--server", fake_server.target)
    assert code == 0 and fake_server.admin.registered[-1].path == "/srv/sql" and fake_server.admin.uploads == []

    (adapter_dir.path / "nested").mkdir()
    code, out, err = run(capsys, "adapters", "register", "sql", str(adapter_dir.path), "--server", fake_server.target)
    assert code == 2 and out == "" and "subdirectory" in err and fake_server.admin.uploads == []


def test_adapters_list_show_delete(fake_server, capsys):
    target = ["--server", fake_server.target]
    assert run(capsys, "adapters", "register", "sql", "/srv/sql", "--server-path", *target)[0] == 0
    code, out, _ = run(capsys, "adapters", "list", *target)
    assert code == 0 and [a["name"] for a in json.loads(out)] == ["sql"]
    code, out, _ = run(capsys, "adapters", "show", "sql@1", *target)
    assert code == 0 and json.loads(out)["ranks"] == {"q_proj": 8}
    code, out, _ = run(capsys, "adapters", "delete", "sql", *target)
    assert code == 0 and [a["version"] for a in json.loads(out)] == [1]
    code, out, err = run(capsys, "adapters", "show", "sql", *target)
    assert (code, out, err.strip()) == (1, "", "error: NOT_FOUND: unknown adapter 'sql'")


def test_endpoints_create_update_list_delete(fake_server, capsys):
    target = ["--server", fake_server.target]
    code, out, _ = run(capsys, "endpoints", "create", "sql-task", "--adapter", "sql@1", "--template", "Q: {input}",
                       "--system-message", "be terse", "--temperature", "0", "--top-k", "5", "--stop", "\n",
                       "--max-new-tokens-cap", "32", "--canary", "sql@2:0.25", *target)
    assert code == 0
    created = json.loads(out)
    assert created["defaults"] == {"temperature": 0.0, "top_k": 5, "stop": ["\n"]}
    assert created["canary"] == {"adapter": "sql@2", "weight": 0.25} and created["max_new_tokens_cap"] == 32
    assert not fake_server.admin.endpoint_requests[-1].defaults.HasField("top_p")

    code, out, _ = run(capsys, "endpoints", "update", "sql-task", "--adapter", "sql@2", "--top-p", "0.9", *target)
    updated = json.loads(out)
    assert code == 0 and updated["adapter"] == "sql@2"
    assert (updated["template"], updated["system_message"], updated["max_new_tokens_cap"]) == ("Q: {input}", "be terse", 32)
    assert updated["defaults"] == {"temperature": 0.0, "top_p": 0.9, "top_k": 5, "stop": ["\n"]}
    assert updated["canary"] == {"adapter": "sql@2", "weight": 0.25}

    code, out, _ = run(capsys, "endpoints", "update", "sql-task", "--no-canary", *target)
    assert code == 0 and "canary" not in json.loads(out)

    code, out, _ = run(capsys, "endpoints", "list", *target)
    assert code == 0 and [e["name"] for e in json.loads(out)] == ["sql-task"]
    code, out, _ = run(capsys, "endpoints", "show", "sql-task", *target)
    assert code == 0 and json.loads(out)["adapter"] == "sql@2"
    code, out, _ = run(capsys, "endpoints", "delete", "sql-task", *target)
    assert code == 0 and json.loads(out) == {"deleted": "sql-task"}
    code, _, err = run(capsys, "endpoints", "update", "sql-task", "--adapter", "x", *target)
    assert code == 1 and err.strip() == "error: NOT_FOUND: unknown endpoint 'sql-task'"


def test_tls(tls_fake_server, capsys, tmp_path):
    target = ["--server", tls_fake_server.target]
    code, out, _ = run(capsys, "complete", *target, "--tls-ca", tls_fake_server.ca, "--json", "hi")
    assert code == 0 and json.loads(out)["text"] == " you said hi"
    code, _, err = run(capsys, "complete", *target, "--timeout", "10", "hi")  # plaintext against TLS fails
    assert code == 1 and err.startswith("error: UNAVAILABLE")
    code, _, err = run(capsys, "adapters", "list", *target, "--tls-ca", str(tmp_path / "absent.pem"))
    assert code == 2 and "absent.pem" in err


def test_complete_json_in_subprocess(fake_server, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.clients.cli", "complete", "--server", fake_server.target, "--adapter", "sql@4",
         "--json", "hello"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert list(result) == COMPLETE_KEYS and result["adapter"] == "sql@4" and result["text"] == " you said hello"


def test_complete_does_not_import_torch(fake_server, tmp_path):
    script = (
        "import sys, json\n"
        "from loraplex.clients.cli import main\n"
        f"code = main(['complete', '--server', {fake_server.target!r}, '--json', 'hi'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'loraplex.server') if m in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}
